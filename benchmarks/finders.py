"""bsfinder against Lightning's ``Tuner.scale_batch_size`` and Accelerate's
``find_executable_batch_size``, under the same CPU memory budget.

    pip install lightning accelerate
    python benchmarks/finders.py                  # 3 models x 5 finders: ~8 min on 2 cores
    python benchmarks/finders.py --smoke          # SmallCNN 3x32x32, 48 MiB: bsfinder, accelerate
                                                  # (no patched rerun), < 60 s
    python benchmarks/finders.py --models gpt2 --finders bsfinder accelerate --out x.json

Every finder runs in its own fresh process whose address space is limited the way bsfinder
limits its trial processes (``CpuBackend.apply_budget``: torch's threads warmed up, then
``RLIMIT_AS`` = the process's address space + the budget), with bsfinder's allocator
environment (``allocator_env()``). Imports, a toy training step and one step of a throwaway
copy of the model at batch 2 (lazy imports, one-time set-up) happen before the limit (see
``_prepare``); for Lightning also one toy tuner run, so that its lazily imported loops are
not counted as training memory. The model is built under the limit, as in bsfinder's
trials. Every finder trains with the same step: bsfinder's ``Workload`` (forward, the
model's own loss for HF models or the mean of the outputs, backward, AdamW at lr 0,
zero_grad), on one batch made once per batch size (Lightning: an iterable data set that
yields that batch, so no collation or prefetch copy is counted).

- bsfinder: ``find_batch_size(device="cpu", memory_limit=budget, time_limit=None)`` with its
  default trial plan (timed trials 1 warm-up + 3 steps while throughput rises, untimed
  fit-only trials of 2 steps after), granularity 8 (the default) and, as ``bsfinder-g1``, 1:
  the exact answer (it forks its own limited trial processes; the finder's process is not
  limited).
- Lightning: ``Tuner(trainer).scale_batch_size(mode="power"|"binsearch", init_val=1,
  max_trials=25, steps_per_trial=3)`` (defaults otherwise: binsearch takes 5% off its answer).
- Accelerate: ``find_executable_batch_size(starting_batch_size=S)`` around 3 training steps;
  on an out-of-memory error it retries at ``int(0.9 * batch)`` (accelerate 1.x).

A library that stops on an error it does not take for out-of-memory is recorded as
``crashed: ...``; when that error is an allocation failure (bsfinder's classifier under the
limit, or ``std::bad_alloc``), the finder runs again with its out-of-memory test patched to
accept it (``... (CPU OOM patched)``).

Both libraries search in one process. Measured here (``tried`` records the address space
each trial starts with, above the baseline): an out-of-memory error inside ``backward()``
leaves the forward pass's saved tensors alive with no Python object referring to them
(pytorch/pytorch#82218; e.g. 213 MiB for the ResNet after batch 359), so every later trial
in that process fails, and oneDNN's primitive cache keeps ~8-22 MiB of address space for
each new batch shape (none with ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``).

The true largest batch: doubling from 1, then bisection at granularity 1, each candidate
alone in a brand-new process (``bsfinder.execution.process.check_batch``, 1 warm-up + 3 steps),
independent of the finders' answers; results are cached in ``--cache`` so that reruns are
fast. Each finder's answer is checked the same way (``fits``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import header
from benchmarks.estimate import MODELS as ESTIMATE_MODELS
from bsfinder.core.results import write_text_atomic
from bsfinder.units import format_bytes, parse_bytes
from bsfinder.workload.loading import parse_input_spec
from bsfinder.workload.step import WorkloadSpec

# the specs of benchmarks/estimate.py; accelerate starts at a generous power of two, several
# times the true largest batch (which a user would not know)
# at the sizes (#14): the CNN at 3x64x64 and GPT-2 under 1 GiB, the ResNet under 512 MiB
MODELS: dict[str, dict[str, Any]] = {
    "small-cnn": {
        **ESTIMATE_MODELS["small-cnn"],
        "inputs": ["3x64x64"],
        "budget": 2**30,
        "accelerate_start": 4096,
    },
    "gpt2": {**ESTIMATE_MODELS["gpt2"], "budget": 2**30, "accelerate_start": 256},
    "resnet": {**ESTIMATE_MODELS["resnet"], "budget": 512 * 2**20, "accelerate_start": 4096},
}
FINDERS = ("bsfinder", "bsfinder-g1", "lightning-power", "lightning-binsearch", "accelerate")
STEPS = 3  # steps per trial for Lightning and Accelerate; ground truth: 1 warm-up + 3
SMOKE_BUDGET = 48 * 2**20
#: the smoke run's SmallCNN input (small, so that CI's run stays under a minute)
SMOKE_INPUTS = ["3x32x32"]
SMOKE_ACCELERATE_START = 128
WORKER_TIMEOUT_S = 900
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "bsfinder-finders-truth.json"


def spec_of(cfg: dict[str, Any]) -> WorkloadSpec:
    return WorkloadSpec(
        model=cfg["model"],
        model_kwargs=cfg["kwargs"],
        inputs=tuple(parse_input_spec(s) for s in cfg["inputs"]),
    )


# -- the finder's process ---------------------------------------------------------------------
def _oneline(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _oom_like(exc: BaseException) -> bool:
    """An allocation failure: bsfinder's classifier (under the limit), or a C++
    ``std::bad_alloc`` surfaced by torch as ``RuntimeError: std::bad_alloc``."""
    from bsfinder.errors import is_oom

    return is_oom(exc, under_memory_limit=True) or (
        isinstance(exc, RuntimeError) and "std::bad_alloc" in str(exc)
    )


def _where(exc: BaseException) -> list[str]:
    """The innermost Python frames of a crash: ``file:line function``."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)[-6:]
    return [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames]


class _TrialLog(list[Any]):
    """The trials so far, also appended to a file as they happen (kept if the process dies)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def append(self, entry: Any) -> None:
        super().append(entry)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")


def _held(backend: Any) -> int | None:
    """Address space above the baseline now (what the limit counts) in MiB, if known."""
    from bsfinder.devices.cpu import read_proc_status

    now = read_proc_status().get("VmSize")
    if backend is None or now is None or backend._baseline_vm is None:
        return None
    return round((now - backend._baseline_vm) / 2**20, 1)


def _prepare(cfg: dict[str, Any]) -> Any:
    """Before the budget: imports, a toy step, and one real step of a throwaway copy of the
    model at batch 2, so that lazy imports and one-time set-up (and oneDNN's kernels for that
    shape) are not counted as training memory. (bsfinder's worker rehearses on the meta device
    instead; its trial processes never train again after an out-of-memory error.)
    """
    import gc

    from bsfinder.workload.step import Workload

    workload = Workload(spec_of(cfg), "cpu")
    workload.load()
    workload.warm_up()
    workload.model = workload.create_model("cpu")
    workload.model.train()
    workload.begin_trial()
    workload.step(workload.make_batch(2))
    workload.end_trial()
    workload.model = None
    gc.collect()
    return workload


def _limit(budget: int) -> Any:
    from bsfinder.devices.cpu import CpuBackend

    backend = CpuBackend()
    backend.apply_budget(budget)
    return backend


def _run_bsfinder(cfg: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    from bsfinder import find_batch_size

    started = time.perf_counter()
    result = find_batch_size(
        cfg["model"], inputs=cfg["inputs"], model_kwargs=cfg["kwargs"], device="cpu",
        memory_limit=job["budget"], time_limit=None,
        granularity=1 if job["finder"] == "bsfinder-g1" else 8,
    )  # fmt: skip
    return {
        "found": result.max_batch,
        "outcome": "ok" if result.max_batch else "nothing fits",
        # [batch, fits, phase, timed]
        "tried": [[t.batch_size, t.fits, t.phase, t.timed] for t in result.trials],
        "time_optimal": result.time_optimal_batch,
        "search_s": time.perf_counter() - started,
    }


def _lightning_module(workload: Any, batch_size: int) -> Any:
    import lightning.pytorch as pl
    import torch

    class Repeat(torch.utils.data.IterableDataset):
        """Yields one batch, made when iteration starts, for ever (as bsfinder's trials)."""

        def __init__(self, size: int) -> None:
            self.size = size

        def __iter__(self) -> Any:
            args, kwargs = workload.make_batch(self.size)
            batch = {"args": list(args), "kwargs": kwargs}
            while True:
                yield batch

        def __len__(self) -> int:
            return 1 << 30

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = workload.model
            self.batch_size = batch_size
            self.held_output: Any = None

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            output = self.net(*batch["args"], **batch["kwargs"])
            # bsfinder's step holds the output (GPT-2: its logits) until after the optimizer
            # step; so does this one, for the same peak (Lightning alone would drop it here)
            self.held_output = output
            return workload._loss(output)  # the model's own loss, else the mean of outputs

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.held_output = None

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=0.0)

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(Repeat(self.batch_size), batch_size=None)

    return Module()


def _lightning_trainer(root: str) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=root,
    )  # fmt: skip


def _attempt(search: Callable[[], int | None]) -> dict[str, Any]:
    """Run a finder's search (already under the budget): its answer, or how it crashed,
    and its seconds."""
    started = time.perf_counter()
    found: int | None = None
    outcome, oom_like, where = "ok", None, None
    try:
        found = search()
    except Exception as exc:
        outcome = f"crashed: {_oneline(exc)}"
        oom_like = _oom_like(exc)
        where = _where(exc)
    return {
        "found": found,
        "outcome": outcome,
        "oom_like_crash": oom_like,
        "crash_where": where,
        "search_s": time.perf_counter() - started,
    }


def _run_lightning(cfg: dict[str, Any], job: dict[str, Any], workload: Any) -> dict[str, Any]:
    import logging
    import warnings

    import torch
    from lightning.pytorch.tuner import Tuner
    from lightning.pytorch.tuner import batch_size_scaling as scaling

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    mode = job["finder"].split("-", 1)[1]
    root = tempfile.mkdtemp(prefix="finders-lightning-")

    # one toy run before the budget: Lightning's lazy imports and one-time set-up
    from bsfinder.workload.loading import InputSpec
    from bsfinder.workload.step import Workload

    toy_step = Workload(
        WorkloadSpec(inputs=(InputSpec((8,)),), loss="mean"), "cpu", model=torch.nn.Linear(8, 1)
    )
    toy = _lightning_module(toy_step, 1)
    Tuner(_lightning_trainer(root)).scale_batch_size(
        toy, mode=mode, init_val=1, max_trials=1, steps_per_trial=1
    )
    del toy, toy_step

    # instrumentation: which batch each trial ran, and whether it raised
    # [batch, ran, MiB held above the baseline before, error]
    tried = _TrialLog(job["result"] + ".trials")
    original_try = scaling._try_loop_run
    backend: Any = None

    def try_loop_run(trainer: Any, params: Any) -> None:
        size = trainer.lightning_module.batch_size
        held = _held(backend)
        try:
            original_try(trainer, params)
        except BaseException as exc:
            trainer.lightning_module.held_output = None  # as bsfinder's step: not kept
            tried.append([size, False, held, _oneline(exc, 160)])
            raise
        tried.append([size, True, held])

    scaling._try_loop_run = try_loop_run
    if job["patched"]:
        original_is_oom = scaling.is_oom_error

        def is_oom_error(exception: BaseException) -> bool:
            return original_is_oom(exception) or _oom_like(exception)

        scaling.is_oom_error = is_oom_error

    def tune() -> int | None:
        workload.build()
        module = _lightning_module(workload, 1)
        tuner = Tuner(_lightning_trainer(root))
        return tuner.scale_batch_size(
            module, mode=mode, init_val=1, max_trials=25, steps_per_trial=STEPS
        )

    backend = _limit(job["budget"])
    out = _attempt(tune)
    shutil.rmtree(root, ignore_errors=True)
    fitted = [size for size, ok, *_ in tried if ok]
    return {**out, "tried": tried, "largest_success": max(fitted) if fitted else None}


def _run_accelerate(cfg: dict[str, Any], job: dict[str, Any], workload: Any) -> dict[str, Any]:
    import accelerate.utils.memory as memory
    from accelerate.utils import find_executable_batch_size

    memory.clear_device_cache(garbage_collection=True)  # its lazy imports, before the budget
    if job["patched"]:
        original = memory.should_reduce_batch_size

        def should_reduce_batch_size(exc: Exception) -> bool:
            return original(exc) or _oom_like(exc)

        memory.should_reduce_batch_size = should_reduce_batch_size

    # [batch, ran, MiB held above the baseline before, error]
    tried = _TrialLog(job["result"] + ".trials")
    backend: Any = None

    @find_executable_batch_size(starting_batch_size=job["start"])
    def train(batch_size: int) -> int:
        held = _held(backend)
        try:
            batch = workload.make_batch(batch_size)
            workload.begin_trial()
            for _ in range(STEPS):
                workload.step(batch)
        except BaseException as exc:
            tried.append([batch_size, False, held, _oneline(exc, 160)])
            raise
        finally:
            batch = None
            workload.end_trial()
        tried.append([batch_size, True, held])
        return batch_size

    def search() -> int | None:
        workload.build()
        return train()

    backend = _limit(job["budget"])
    return {**_attempt(search), "tried": tried, "start": job["start"]}


def worker(job_path: str) -> int:
    import faulthandler

    faulthandler.enable()  # a crash in native code prints the Python stack to stderr
    with open(job_path, encoding="utf-8") as handle:
        job = json.load(handle)
    cfg = {**MODELS[job["model"]], "inputs": job["inputs"]}
    if job["finder"].startswith("bsfinder"):
        out = _run_bsfinder(cfg, job)
    else:
        if job["finder"].startswith("lightning"):
            import lightning.pytorch  # noqa: F401  (before the budget)
        else:
            import accelerate.utils  # noqa: F401
        workload = _prepare(cfg)
        if job["finder"].startswith("lightning"):
            out = _run_lightning(cfg, job, workload)
        else:
            out = _run_accelerate(cfg, job, workload)
    from bsfinder.devices.cpu import read_proc_status

    out["vm_peak_bytes"] = read_proc_status().get("VmPeak")
    with open(job["result"], "w", encoding="utf-8") as handle:
        json.dump(out, handle)
    return 0


# -- the driver --------------------------------------------------------------------------------
def run_finder(model: str, finder: str, budget: int, start: int, patched: bool) -> dict[str, Any]:
    """Run one finder in a fresh process under the budget; its row (without the checks)."""
    from bsfinder.devices.cpu import allocator_env

    env = {**os.environ, **allocator_env()}
    with tempfile.TemporaryDirectory(prefix="finders-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        job = {
            "model": model, "finder": finder, "budget": budget, "start": start,
            "patched": patched, "result": result_path, "inputs": MODELS[model]["inputs"],
        }  # fmt: skip
        job_path = os.path.join(tmp, "job.json")
        with open(job_path, "w", encoding="utf-8") as handle:
            json.dump(job, handle)
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--worker", job_path],
                env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
            )  # fmt: skip
            code: int | None = proc.returncode
            lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
            fatal = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error")]
            # faulthandler's report (innermost frames first), else the last lines
            tail = " | ".join(lines[fatal[-1] : fatal[-1] + 8] if fatal else lines[-4:])
        except subprocess.TimeoutExpired:
            code, tail = None, f"timed out after {WORKER_TIMEOUT_S} s"
        process_s = time.perf_counter() - started
        if os.path.exists(result_path):
            with open(result_path, encoding="utf-8") as handle:
                out = json.load(handle)
        else:
            why = f"exit code {code}" if code is not None and code >= 0 else f"signal {code}"
            out = {"found": None, "outcome": f"crashed: process died ({why}): {tail}"}
            if os.path.exists(result_path + ".trials"):  # what it tried before it died
                with open(result_path + ".trials", encoding="utf-8") as handle:
                    out["tried"] = [json.loads(line) for line in handle if line.strip()]
    label = finder + (" (CPU OOM patched)" if patched else "")
    return {
        "finder": label,
        "model": model,
        "budget_bytes": budget,
        **out,
        "trials": len(out.get("tried", [])),
        "process_s": round(process_s, 2),
        "search_s": round(out["search_s"], 2) if "search_s" in out else None,
    }


class Truth:
    """Fresh-process checks of ``(model, budget, batch)``, cached in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.cache: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.cache = {}
        self.checks = 0
        self.seconds = 0.0

    @staticmethod
    def key(model: str, budget: int, batch: int) -> str:
        """What a check depends on: the model's whole spec, the budget, the batch, the steps."""
        cfg = MODELS[model]
        kwargs = json.dumps(cfg["kwargs"], sort_keys=True)
        return f"{cfg['model']}|{','.join(cfg['inputs'])}|{kwargs}|{budget}|{batch}|{STEPS}"

    def fits(self, model: str, budget: int, batch: int) -> bool:
        from bsfinder.execution.process import check_batch

        key = self.key(model, budget, batch)
        if key not in self.cache:
            started = time.perf_counter()
            trial = check_batch(
                spec_of(MODELS[model]), batch, device="cpu", memory_limit_bytes=budget, steps=STEPS
            )
            elapsed = time.perf_counter() - started
            self.cache[key] = {"fits": trial.fits, "error": trial.error, "s": round(elapsed, 2)}
            self.checks += 1
            self.seconds += elapsed
            write_text_atomic(str(self.path), json.dumps(self.cache, indent=1))
        return bool(self.cache[key]["fits"])

    def largest(self, model: str, budget: int, hint: int) -> dict[str, Any]:
        """Bisection at granularity 1 from ``hint``: gallop to a fit/fail bracket, then halve."""
        checks, seconds, started = self.checks, self.seconds, time.perf_counter()
        probes: list[int] = []

        def fits(b: int) -> bool:
            probes.append(b)
            return self.fits(model, budget, b)

        hint = max(1, hint)
        if fits(hint):
            low, step = hint, 1
            while fits(low + step):
                low, step = low + step, step * 2
            high = low + step
        else:
            high, step = hint, 1
            while high - step >= 1 and not fits(high - step):
                high, step = high - step, step * 2
            low = max(0, high - step)
        while high - low > 1:
            mid = (low + high) // 2
            if fits(mid):
                low = mid
            else:
                high = mid
        fresh = self.checks - checks
        costs = [self.cache[self.key(model, budget, b)]["s"] for b in probes]
        return {
            "model": model,
            "budget_bytes": budget,
            "true_largest": low or None,
            "first_failure": high,
            "candidates_checked": len(probes),
            "fresh_processes": fresh,
            "seconds": round(time.perf_counter() - started, 2),
            "seconds_fresh": round(self.seconds - seconds, 2),
            "probes": probes,
            "seconds_uncached": round(sum(costs), 2),  # every candidate run fresh
        }


def _fmt(row: dict[str, Any], true_largest: int | None) -> str:
    found = row.get("found")
    frac = f"{found / true_largest:.3f}" if found and true_largest else "-"
    fits = {True: "yes", False: "NO", None: "-"}[row.get("fits")]
    return (
        f"{row['model']:<10} {row['finder']:<40} {found!s:>6} {row['trials']:>6} "
        f"{row['search_s']!s:>8} {row['process_s']:>8} {frac:>6} {fits:>5}  {row['outcome'][:90]}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="SmallCNN, bsfinder + accelerate")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--finders", nargs="+", choices=FINDERS, default=list(FINDERS))
    parser.add_argument("--budget", help="one budget for every model (default: per model)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="fresh-process results")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.smoke:
        args.models, args.finders = ["small-cnn"], ["bsfinder", "accelerate"]
        MODELS["small-cnn"]["inputs"] = SMOKE_INPUTS  # the worker's too (it reads the job)
        args.budget = args.budget or str(SMOKE_BUDGET)
    total_started = time.perf_counter()
    truth = Truth(Path(args.cache))
    rows: list[dict[str, Any]] = []
    truths: list[dict[str, Any]] = []
    for model in args.models:
        cfg = MODELS[model]
        budget = parse_bytes(args.budget) if args.budget else cfg["budget"]
        start = SMOKE_ACCELERATE_START if args.smoke else cfg["accelerate_start"]
        print(f"{model}: budget {format_bytes(budget)}", flush=True)
        model_rows = []
        for finder in args.finders:
            row = run_finder(model, finder, budget, start, patched=False)
            print(f"  {row['finder']}: {row['found']} ({row['outcome'][:200]})", flush=True)
            model_rows.append(row)
            if not finder.startswith("bsfinder") and row.get("oom_like_crash") and not args.smoke:
                row = run_finder(model, finder, budget, start, patched=True)
                print(f"  {row['finder']}: {row['found']} ({row['outcome'][:200]})", flush=True)
                model_rows.append(row)
        for row in model_rows:
            row["fits"] = truth.fits(model, budget, row["found"]) if row["found"] else None
        found_truth = truth.largest(model, budget, 1)  # independent of the finders
        truths.append(found_truth)
        print(
            f"  true largest {found_truth['true_largest']} ({found_truth['first_failure']} "
            f"fails): {found_truth['candidates_checked']} candidates, "
            f"{found_truth['seconds_uncached']} s in fresh processes "
            f"({found_truth['fresh_processes']} not cached: {found_truth['seconds']} s now)",
            flush=True,
        )
        for row in model_rows:
            t = found_truth["true_largest"]
            row["true_largest"] = t
            row["fraction_of_true"] = round(row["found"] / t, 3) if row["found"] and t else None
        rows.extend(model_rows)
    total_s = time.perf_counter() - total_started
    print()
    print(
        f"{'model':<10} {'finder':<40} {'batch':>6} {'trials':>6} {'search s':>8} "
        f"{'proc s':>8} {'frac':>6} {'fits':>5}  outcome"
    )
    by_model = {t["model"]: t["true_largest"] for t in truths}
    for row in rows:
        print(_fmt(row, by_model[row["model"]]))
    print(f"total {total_s:.0f} s")
    verdicts = _verdicts(rows)
    for v in verdicts:
        print(
            f"{v['model']}: bsfinder-g1 {v['bsfinder_s']} s ({v['trials']} trials, exact: "
            f"{v['exact']}) against Lightning binsearch {v['binsearch_s']} s (ratio "
            f"{v['vs_binsearch']}) and power {v['power_s']} s (ratio {v['vs_power']})"
        )
    if args.out:
        result = {
            "header": header(),
            "settings": {
                "steps_per_trial": STEPS,
                # the defaults: timed trials 1 warm-up + 3 steps, untimed ones 2 steps
                "bsfinder": {"defaults": True, "granularity": 8, "time_limit": None},
                "bsfinder-g1": {"defaults": True, "granularity": 1, "time_limit": None},
                "lightning": {"init_val": 1, "max_trials": 25, "steps_per_trial": STEPS},
                "accelerate_start": {
                    m: SMOKE_ACCELERATE_START if args.smoke else MODELS[m]["accelerate_start"]
                    for m in args.models
                },
                "truth_steps": {"warmup_steps": 1, "steps": STEPS},
            },
            "versions": _versions(),
            "rows": rows,
            "truth": truths,
            "verdicts": verdicts,
            "total_s": round(total_s, 2),
        }
        write_text_atomic(args.out, json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0 if all(r["fits"] for r in rows if r["found"]) else 1


def _verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: bsfinder's exact search (g1) against Lightning's, whole process seconds
    (issue #14's bar: at most half of binsearch's, at most power mode's)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["finder"]: r for r in rows if r["model"] == model}
        ours = by.get("bsfinder-g1")
        if ours is None:
            continue
        binsearch, power = by.get("lightning-binsearch"), by.get("lightning-power")

        def ratio(other: dict[str, Any] | None, ours: dict[str, Any] = ours) -> float | None:
            return round(ours["process_s"] / other["process_s"], 2) if other else None

        out.append(
            {
                "model": model,
                "bsfinder_s": ours["process_s"],
                "trials": ours["trials"],
                "exact": ours.get("fraction_of_true") == 1.0 and ours.get("fits") is True,
                "binsearch_s": binsearch["process_s"] if binsearch else None,
                "power_s": power["process_s"] if power else None,
                "vs_binsearch": ratio(binsearch),
                "vs_power": ratio(power),
            }
        )
    return out


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("lightning", "accelerate", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
