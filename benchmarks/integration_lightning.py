"""bsfinder's Lightning integration against Lightning's own ``Tuner.scale_batch_size``, on
one LightningModule under one CPU memory budget, each answer checked by ``Trainer.fit``.

    pip install lightning
    python benchmarks/integration_lightning.py               # ~3 min + Lightning's binsearch
    python benchmarks/integration_lightning.py --worker-timeout 300  # 7 min 14 s on 2 cores
    python benchmarks/integration_lightning.py --smoke       # bsfinder alone, < 60 s

The module (:class:`TokenMLP`): a per-token MLP ``Linear(64, 512) -> ReLU -> Linear(512,
64)`` over 128 tokens, an MSE loss, AdamW, a random ``TensorDataset`` of 512 samples, and a
``batch_size`` hparam its ``train_dataloader`` reads. About 1 MiB of training memory per
sample, so that one sample more or less is well above the noise of a process's address space.

Every finder runs in its own fresh process under the same budget:
- ``lightning-power`` / ``lightning-binsearch``: ``Tuner(trainer).scale_batch_size(module,
  mode=..., init_val=2, steps_per_trial=3)`` (defaults otherwise: binsearch takes 5% off);
  the process is limited the way bsfinder limits its trial processes
  (``CpuBackend.apply_budget``: ``RLIMIT_AS`` = the address space after imports + the
  budget), after imports and one toy tuner run (Lightning's lazy imports are not training
  memory); the module is built under the limit.
- ``bsfinder-exact`` / ``bsfinder-power``:
  ``bsfinder.integrations.lightning.scale_batch_size(module, trainer, memory_limit=budget,
  mode=...)``: its trials are fresh processes under the budget (the finder's own process
  is not limited).

Each answer (and the next batch: answer + 1 for exact, 2x for power) is checked by
:func:`fit_fits`: ``Trainer.fit(max_steps=3)`` of a new module at that batch in a brand-new
process, limited the same way (imports and a toy fit first, the module built under it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.finders import _limit, _oneline

BUDGET = 256 * 2**20
FIT_STEPS = 3  # Trainer.fit(max_steps=...) of a check: as many steps as a trial runs
STEPS_PER_TRIAL = 3
FINDERS = ("bsfinder-exact", "bsfinder-power", "lightning-power", "lightning-binsearch")
MODULE = "benchmarks.integration_lightning:TokenMLP"
WORKER_TIMEOUT_S = 900
#: a trainer that runs the training loop only (what the integration's wiring covers)
TRAINER: dict[str, Any] = {
    "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
}  # fmt: skip


class TokenMLP(pl.LightningModule):
    """A per-token MLP on a random TensorDataset; ``hparams.batch_size`` batches it."""

    def __init__(
        self,
        batch_size: int = 32,
        samples: int = 512,
        tokens: int = 128,
        width: int = 64,
        hidden: int = 512,
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(
            torch.randn(samples, tokens, width, generator=generator),
            torch.randn(samples, tokens, width, generator=generator),
        )

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> Any:
        return DataLoader(self.data, batch_size=self.hparams.batch_size, shuffle=True)


class TokenMLPEval(TokenMLP):
    """:class:`TokenMLP` with a validation loop over the same data, by the same batch size
    (a subclass: with a ``val_dataloader`` a fit would validate at the end of its epoch)."""

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("val_loss", loss)
        return loss

    def val_dataloader(self) -> Any:
        return DataLoader(self.data, batch_size=self.hparams.batch_size)


class _Toy(pl.LightningModule):
    """A toy fit before the budget: Lightning's loops and AdamW are imported lazily."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 2
        self.net = nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return self.net(batch[0]).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.0)

    def train_dataloader(self) -> Any:
        return DataLoader(TensorDataset(torch.randn(8, 8)), batch_size=self.batch_size)


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _peak_above(backend: Any) -> int | None:
    """The process's peak address space above the limit's baseline (what the limit counts)."""
    from bsfinder.devices.cpu import read_proc_status

    peak = read_proc_status().get("VmPeak")
    base = backend._baseline_vm
    return None if peak is None or base is None else peak - base


# -- workers (each a fresh process) -------------------------------------------------------------
def _fit_worker(job: dict[str, Any]) -> dict[str, Any]:
    """``Trainer.fit(max_steps=...)`` at ``job["batch"]`` under the budget (``job["entry"]``
    ``"validate"``: ``Trainer.validate(limit_val_batches=steps)`` instead)."""
    from bsfinder.errors import is_oom
    from bsfinder.workload.loading import load_object

    _quiet()
    factory = load_object(job["module"])  # its module imported before the budget
    root = tempfile.mkdtemp(prefix="lightning-fit-")
    pl.Trainer(**TRAINER, max_steps=1, default_root_dir=root).fit(_Toy())
    backend = _limit(job["budget"])
    started = time.perf_counter()
    try:
        module = factory(batch_size=job["batch"], **job.get("kwargs", {}))
        if job.get("entry", "fit") == "validate":
            trainer = pl.Trainer(**TRAINER, limit_val_batches=job["steps"], default_root_dir=root)
            trainer.validate(module, verbose=False)
            steps = int(trainer.validate_loop.batch_progress.total.completed)
        else:
            trainer = pl.Trainer(**TRAINER, max_steps=job["steps"], default_root_dir=root)
            trainer.fit(module)
            steps = trainer.global_step
        outcome = "ok" if steps == job["steps"] else f"ran {steps} of {job['steps']} steps"
    except Exception as exc:
        oom = is_oom(exc, under_memory_limit=True) or "std::bad_alloc" in str(exc)
        outcome = ("oom: " if oom else "crashed: ") + _oneline(exc, 300)
    return {
        "outcome": outcome,
        "fit_s": time.perf_counter() - started,
        "peak_above_baseline_bytes": _peak_above(backend),
    }


def _tuner_worker(job: dict[str, Any]) -> dict[str, Any]:
    from lightning.pytorch.tuner import Tuner

    from bsfinder.workload.loading import load_object

    _quiet()
    factory = load_object(job["module"])
    mode = job["finder"].split("-", 1)[1]
    root = tempfile.mkdtemp(prefix="lightning-tune-")
    Tuner(pl.Trainer(**TRAINER, max_epochs=1, default_root_dir=root)).scale_batch_size(
        _Toy(), mode=mode, init_val=1, max_trials=1, steps_per_trial=1
    )
    _limit(job["budget"])
    started = time.perf_counter()
    found, outcome = None, "ok"
    try:
        module = factory(batch_size=2, **job.get("kwargs", {}))
        tuner = Tuner(pl.Trainer(**TRAINER, max_epochs=1, default_root_dir=root))
        found = tuner.scale_batch_size(
            module, mode=mode, init_val=2, max_trials=25, steps_per_trial=STEPS_PER_TRIAL
        )
    except Exception as exc:
        outcome = "crashed: " + _oneline(exc, 300)
    return {"found": found, "outcome": outcome, "search_s": time.perf_counter() - started}


def _bsfinder_worker(job: dict[str, Any]) -> dict[str, Any]:
    from bsfinder.integrations.lightning import scale_batch_size
    from bsfinder.workload.loading import load_object

    _quiet()
    module = load_object(job["module"])(batch_size=2, **job.get("kwargs", {}))
    trainer = pl.Trainer(**TRAINER, max_steps=FIT_STEPS)
    mode = job["finder"].split("-", 1)[1]
    started = time.perf_counter()
    found = scale_batch_size(
        module, trainer, mode=mode, memory_limit=job["budget"], time_limit=None,
        steps_per_trial=STEPS_PER_TRIAL,
    )  # fmt: skip
    return {
        "found": found.batch_size,
        "outcome": "ok",
        "set_on": list(found.set_on),
        "module_batch_size_after": module.hparams.batch_size,
        "tried": [[t.batch_size, t.fits] for t in found.probe.trials],
        "search_s": time.perf_counter() - started,
    }


WORKERS = {"fit": _fit_worker, "tuner": _tuner_worker, "bsfinder": _bsfinder_worker}


def _run(kind: str, job: dict[str, Any], timeout_s: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    """Run a worker in a brand-new interpreter with bsfinder's allocator environment; one
    that runs past ``timeout_s`` is stopped and recorded as giving no answer."""
    from bsfinder.devices.cpu import allocator_env

    env = {**os.environ, **allocator_env(), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with tempfile.TemporaryDirectory(prefix="lightning-bench-") as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        with open(job_path, "w", encoding="utf-8") as handle:
            json.dump({**job, "out": out_path}, handle)
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--worker", kind, job_path],
                env=env, capture_output=True, text=True, timeout=timeout_s,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            process_s = time.perf_counter() - started
            return {"outcome": f"no answer in {timeout_s:.0f} s: stopped", "process_s": process_s}
        process_s = time.perf_counter() - started
        if not os.path.exists(out_path):
            tail = " | ".join(proc.stderr.strip().splitlines()[-4:])
            return {"outcome": f"crashed: exit {proc.returncode}: {tail}", "process_s": process_s}
        with open(out_path, encoding="utf-8") as handle:
            return {**json.load(handle), "process_s": round(process_s, 2)}


def fit_fits(
    batch: int,
    budget: int = BUDGET,
    *,
    module: str = MODULE,
    kwargs: dict[str, Any] | None = None,
    steps: int = FIT_STEPS,
    entry: str = "fit",
) -> dict[str, Any]:
    """``Trainer.fit(max_steps=steps)`` (``entry="validate"``: ``Trainer.validate`` of
    ``steps`` batches) of ``module(batch_size=batch, **kwargs)`` (a ``"pkg.mod:Factory"``)
    in a brand-new process under ``budget``; its ``outcome`` is ``"ok"``, ``"oom: ..."`` or
    ``"crashed: ..."``."""
    job = {"module": module, "batch": batch, "budget": budget, "steps": steps, "entry": entry}
    return _run("fit", {**job, "kwargs": kwargs or {}})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="bsfinder-exact alone")
    parser.add_argument("--finders", nargs="+", choices=FINDERS, default=list(FINDERS))
    parser.add_argument("--budget", type=int, default=BUDGET, help="bytes")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument(
        "--worker-timeout", type=float, default=WORKER_TIMEOUT_S, help="per finder, seconds"
    )
    args = parser.parse_args()
    if args.worker:
        kind, path = args.worker
        with open(path, encoding="utf-8") as handle:
            job = json.load(handle)
        out = WORKERS[kind](job)
        with open(job["out"], "w", encoding="utf-8") as handle:
            json.dump(out, handle)
        return 0
    from benchmarks.common import header

    finders = ["bsfinder-exact"] if args.smoke else args.finders
    started = time.perf_counter()
    rows = []
    for finder in finders:
        kind = "bsfinder" if finder.startswith("bsfinder") else "tuner"
        job = {"module": MODULE, "finder": finder, "budget": args.budget}
        row = {"finder": finder, **_run(kind, job, args.worker_timeout)}
        found = row.get("found")
        if found:
            row["fit_at_answer"] = fit_fits(found, args.budget)["outcome"]
            above = found * 2 if finder.endswith("power") else found + 1
            row["next_batch"] = above
            row["fit_at_next"] = fit_fits(above, args.budget)["outcome"]
        print(
            f"{finder:<22} batch {found!s:>5}  search {row.get('search_s', 0):6.1f} s  process "
            f"{row['process_s']:6.1f} s  fit({found}): {row.get('fit_at_answer', '-')[:40]}  "
            f"fit({row.get('next_batch', '-')}): {row.get('fit_at_next', '-')[:40]}",
            flush=True,
        )
        rows.append(row)
    total_s = time.perf_counter() - started
    print(f"total {total_s:.0f} s")
    if args.out:
        from bsfinder.core.results import write_text_atomic

        result = {
            "header": header(),
            "lightning": pl.__version__,
            "settings": {
                "module": MODULE,
                "budget_bytes": args.budget,
                "fit_steps": FIT_STEPS,
                "steps_per_trial": STEPS_PER_TRIAL,
                "init_val": 2,
                "trainer": TRAINER,
                "worker_timeout_s": args.worker_timeout,
            },
            "rows": rows,
            "total_s": round(total_s, 2),
        }
        write_text_atomic(args.out, json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    ok = all(r.get("fit_at_answer") == "ok" for r in rows if r.get("found"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
