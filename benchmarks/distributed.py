"""Distributed probes against the scale-out estimate from a single-device probe.

    python benchmarks/distributed.py           # CPU, 2 ranks, gloo: results/cpu-distributed.json
    python benchmarks/distributed.py --device cuda --ranks 1  # one GPU, NCCL, world size 1

For each model: a single-device probe (``bsfinder probe``), then ``bsfinder scale-out``'s
estimate for DDP and FSDP over the ranks, then the real probe under ``torchrun`` with each
strategy and the same memory per rank. Compared: the per-rank peak at the real probe's
largest batch (estimated vs measured, on the rank with the highest peak) and the largest
per-rank batch (estimated vs found). Every probe runs in its own processes, one after the
other.
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

from benchmarks.common import ROOT, header
from bsfinder.core.results import ProbeResult, write_text_atomic
from bsfinder.core.scaleout import scale_out
from bsfinder.units import format_bytes

HF = f"{ROOT}/examples/hf_models.py"
MODELS: dict[str, dict[str, Any]] = {
    # weights, gradients and AdamW state dominate: 21 M parameters in three Linear layers
    "mlp": {
        "model": "tests.models:mlp",
        "args": ["--input", "1024", "--model-kwargs", '{"width": 1024, "hidden": 4096}'],
        "budget": "768MiB",
        "granularity": "8",
    },
    # a transformer: FSDP shards each block; the tied embedding stays with the root
    "gpt2": {
        "model": f"{HF}:gpt2",
        "args": [
            "--input", "input_ids=128:int64:8192", "--input", "labels=128:int64:8192",
            "--model-kwargs", '{"n_layer": 4, "n_embd": 256, "vocab_size": 8192}',
        ],
        "budget": "1GiB",
        "granularity": "1",  # its largest batches are small: exact
    },
}  # fmt: skip
COMMON = ["--optimizer", "adamw", "--steps", "2", "--quiet"]


def _probe(
    model: dict[str, Any], device: str, out: Path, ranks: int = 0, strategy: str = ""
) -> tuple[ProbeResult, float]:
    """One probe in fresh processes: ``bsfinder probe`` alone, or under torchrun."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
    command = [sys.executable, "-m", "bsfinder", "probe"]
    if ranks:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // ranks)))
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
            "-m", "bsfinder", "probe", "--strategy", strategy,
        ]  # fmt: skip
    command += [
        model["model"], *model["args"], *COMMON, "--device", device,
        "--granularity", model["granularity"], "--json", str(out),
    ]  # fmt: skip
    command += ["--memory-limit", model["budget"]]  # on CUDA: an allocator cap
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return ProbeResult.load(str(out)), seconds


def _compare(single: ProbeResult, real: ProbeResult, strategy: str, ranks: int) -> dict[str, Any]:
    estimate = scale_out(single, strategy, ranks, capacity_bytes=real.capacity_bytes)
    found = real.recommendations.max_batch
    at = real.trial(found) if found else None
    measured = max((r["peak_bytes"] for r in at.ranks), default=None) if at else None
    predicted = estimate.peak_bytes(found) if found else None
    by_batch = []
    for trial in sorted(real.trials, key=lambda t: t.batch_size):
        if trial.fits and trial.ranks:
            peak = max(r["peak_bytes"] for r in trial.ranks)
            guess = estimate.peak_bytes(trial.batch_size)
            by_batch.append(
                {"batch": trial.batch_size, "measured": peak, "estimate": guess,
                 "error": (guess - peak) / peak}
            )  # fmt: skip
    return {
        "strategy": strategy,
        "ranks": ranks,
        "estimate": {
            "fixed_bytes": estimate.fixed_bytes,
            "per_sample_bytes": round(estimate.per_sample_bytes),
            "floor_bytes": estimate.floor_bytes,
            "terms": estimate.terms,
            "floor_terms": estimate.floor_terms,
            "max_batch": estimate.max_batch,
        },
        "peak_by_batch": by_batch,
        "worst_peak_error": max((row["error"] for row in by_batch), key=abs, default=None),
        "probe": {
            "max_batch": found,
            "first_failure": real.recommendations.first_failure,
            "trials": len(real.trials),
            "duration_s": round(real.duration_s or 0, 2),
            "peak_bytes_at_max_batch": measured,
            "peak_bytes_per_rank": [r["peak_bytes"] for r in at.ranks] if at else None,
            "state_bytes_at_max_batch": at.state_bytes if at else None,
            "step_s_at_max_batch": at.step_s if at else None,
        },
        "peak_error": (predicted - measured) / measured if predicted and measured else None,
        "max_batch_error": (
            (estimate.max_batch - found) / found if estimate.max_batch and found else None
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{kind}-distributed.json")
    report: dict[str, Any] = {"header": header(), "ranks": args.ranks, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bsfinder-dist-") as tmp:
        for name in args.models:
            model = MODELS[name]
            single, seconds = _probe(model, args.device, Path(tmp) / f"{name}-single.json")
            entry: dict[str, Any] = {
                "budget": model["budget"],
                "single": {
                    "max_batch": single.recommendations.max_batch,
                    "trials": len(single.trials),
                    "seconds": round(seconds, 2),
                    "parameter_bytes": single.workload.get("parameter_bytes"),
                    "largest_unit_bytes": single.workload.get("largest_unit_bytes"),
                    "root_unit_bytes": single.workload.get("root_unit_bytes"),
                },
                "strategies": [],
            }
            print(
                f"{name}: single device, largest batch {single.recommendations.max_batch}",
                flush=True,
            )
            for strategy in ("ddp", "fsdp"):
                path = Path(tmp) / f"{name}-{strategy}.json"
                real, seconds = _probe(model, args.device, path, args.ranks, strategy)
                row = _compare(single, real, strategy, args.ranks)
                row["seconds"] = round(seconds, 2)
                if kind == "cuda":
                    row["probe_result"] = real.to_dict()
                entry["strategies"].append(row)
                err = row["peak_error"]
                worst = row["worst_peak_error"]
                print(
                    f"  {strategy} x{args.ranks}: largest {row['probe']['max_batch']} "
                    f"(estimate {row['estimate']['max_batch']}); peak there "
                    f"{format_bytes(row['probe']['peak_bytes_at_max_batch'])}, estimate "
                    f"{'-' if err is None else f'{err:+.1%}'}, worst over "
                    f"{len(row['peak_by_batch'])} batches "
                    f"{'-' if worst is None else f'{worst:+.1%}'}; {seconds:.0f} s",
                    flush=True,
                )
            report["models"][name] = entry
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
