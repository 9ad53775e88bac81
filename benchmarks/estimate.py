"""Estimator accuracy: the estimate of a step's peak against the measured peak, and the
estimated largest batch against the real probe, on CPU.

    python benchmarks/estimate.py          # 4 models: writes results/cpu-estimate.json
    python benchmarks/estimate.py --smoke  # CI: one model, two batches, ~15 s

Measured peak: one trial (a warm-up step, then one step) alone in a brand-new worker
process, as the probe runs it (``bsfinder.execution.process.check_batch``): the address space above
the trial process's baseline. Estimate: ``estimate_memory(..., target="cpu")``, which never
allocates the model. Then, under a budget, the largest batch the estimate predicts is run in
a fresh process, and set against what ``find_batch_size`` finds with real trials.
Last, the estimate for a model this machine could not train (GPT-2 medium on an 80 GiB GPU)
and how long it takes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, header
from bsfinder import estimate_memory, find_batch_size
from bsfinder.core.results import write_text_atomic
from bsfinder.execution.process import check_batch
from bsfinder.units import format_bytes
from bsfinder.workload.loading import parse_input_spec
from bsfinder.workload.step import WorkloadSpec

HF = f"{ROOT}/examples/hf_models.py"
TOKENS = ["input_ids=128:int64:8192", "labels=128:int64:8192"]
MODELS: dict[str, dict[str, Any]] = {
    "small-cnn": {
        "model": "bsfinder.examples:SmallCNN",
        "inputs": ["3x32x32"],
        "kwargs": {},
        "batches": [32, 128, 512],
        "budget": 256 * 2**20,
    },
    "gpt2": {
        "model": f"{HF}:gpt2",
        "inputs": TOKENS,
        "kwargs": {"n_layer": 2, "n_embd": 128, "vocab_size": 8192},
        "batches": [8, 32, 128],
        "budget": 512 * 2**20,
    },
    "bert": {
        "model": f"{HF}:bert",
        "inputs": TOKENS,
        "kwargs": {"num_hidden_layers": 2, "hidden_size": 128, "vocab_size": 8192},
        "batches": [8, 32, 128],
        "budget": 512 * 2**20,
    },
    "resnet": {
        "model": "bsfinder.examples:resnet",
        "inputs": ["pixel_values=3x64x64", "labels=1:int64:10"],
        "kwargs": {},
        "batches": [16, 64, 256],
        "budget": 256 * 2**20,
    },
}
BIG = {
    "model": f"{HF}:gpt2",
    "inputs": ["input_ids=1024:int64:50257", "labels=1024:int64:50257"],
    "kwargs": {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024},
    "target_memory": "80GiB",
}
MEASURE_BUDGET = 8 * 2**30  # far above every peak here: the trial is measured, not limited


def spec_of(cfg: dict[str, Any]) -> WorkloadSpec:
    return WorkloadSpec(
        model=cfg["model"],
        model_kwargs=cfg["kwargs"],
        inputs=tuple(parse_input_spec(s) for s in cfg["inputs"]),
    )


def accuracy(name: str, batches: list[int]) -> list[dict[str, Any]]:
    cfg = MODELS[name]
    est = estimate_memory(
        cfg["model"], inputs=cfg["inputs"], model_kwargs=cfg["kwargs"], batch_sizes=batches,
        target="cpu",
    )  # fmt: skip
    rows = []
    for b in batches:
        trial = check_batch(spec_of(cfg), b, device="cpu", memory_limit_bytes=MEASURE_BUDGET)
        point = est.point(b)
        measured = trial.peak_bytes
        assert measured, f"{name} at {b}: no measured peak ({trial.error})"
        error = (point.peak_bytes - measured) / measured
        rows.append(
            {
                "model": name,
                "batch": b,
                "measured_peak_bytes": measured,
                "estimated_peak_bytes": point.peak_bytes,
                "estimated_tensor_peak_bytes": point.tensor_peak_bytes,
                "estimated_kernel_scratch_bytes": point.kernel_scratch_bytes,
                "estimated_outside_tensors_bytes": point.outside_tensors_bytes,
                "error": round(error, 4),
                "estimate_s": round(est.seconds, 2),
            }
        )
        print(
            f"{name:<10} batch {b:>4}: measured {format_bytes(measured):>10}, estimated "
            f"{format_bytes(point.peak_bytes):>10} ({error:+.1%})",
            flush=True,
        )
    return rows


def largest(name: str) -> dict[str, Any]:
    cfg = MODELS[name]
    budget = cfg["budget"]
    est = estimate_memory(
        cfg["model"], inputs=cfg["inputs"], model_kwargs=cfg["kwargs"], target="cpu",
        target_memory=budget,
    )  # fmt: skip
    started = time.perf_counter()
    probe = find_batch_size(
        cfg["model"], inputs=cfg["inputs"], model_kwargs=cfg["kwargs"], device="cpu",
        memory_limit=budget, warmup_steps=1, steps=1,
    )  # fmt: skip
    probe_s = time.perf_counter() - started
    predicted = est.max_batch
    fits = (
        check_batch(spec_of(cfg), predicted, device="cpu", memory_limit_bytes=budget).fits
        if predicted
        else None
    )
    row = {
        "model": name,
        "budget_bytes": budget,
        "estimated_max_batch": predicted,
        "estimate_s": round(est.seconds, 2),
        "estimated_fits_fresh": fits,
        "probe_max_batch": probe.max_batch,
        "probe_trials": len(probe.trials),
        "probe_s": round(probe_s, 2),
        "ratio": round(predicted / probe.max_batch, 3) if predicted and probe.max_batch else None,
    }
    print(
        f"{name:<10} under {format_bytes(budget)}: estimate {predicted} ({est.seconds:.1f} s; "
        f"{'fits' if fits else 'FAILS'} in a fresh process), probe {probe.max_batch} "
        f"({len(probe.trials)} trials, {probe_s:.1f} s)",
        flush=True,
    )
    return row


def big() -> dict[str, Any]:
    est = estimate_memory(
        BIG["model"], inputs=BIG["inputs"], model_kwargs=BIG["kwargs"],
        target_memory=BIG["target_memory"], precision="bf16-mixed",
    )  # fmt: skip
    point = est.point(est.max_batch) if est.max_batch else None
    print(
        f"GPT-2 medium (24 layers, 1024 tokens) on an {BIG['target_memory']} GPU, bf16-mixed: "
        f"largest batch {est.max_batch} "
        f"(peak {format_bytes(point.peak_bytes) if point else '-'}), "
        f"{len(est.points)} fake steps in {est.seconds:.1f} s",
        flush=True,
    )
    return {
        "model": "gpt2-medium",
        **{k: BIG[k] for k in ("inputs", "kwargs", "target_memory")},
        "estimated_max_batch": est.max_batch,
        "first_failure": est.first_failure,
        "state_bytes": est.state_bytes,
        "points": [(p.batch_size, p.peak_bytes) for p in est.points],
        "estimate_s": round(est.seconds, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one model, two batches (CI)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu-estimate.json"))
    args = parser.parse_args()
    if args.smoke:
        rows = accuracy("small-cnn", [32, 128])
        return 0 if all(abs(r["error"]) <= 0.05 for r in rows) else 1
    rows = [row for name in MODELS for row in accuracy(name, MODELS[name]["batches"])]
    fits = [largest(name) for name in MODELS]
    result = {"header": header(), "accuracy": rows, "largest_batch": fits, "big": big()}
    write_text_atomic(args.out, json.dumps(result, indent=2))
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst error {worst:.1%}; wrote {args.out}")
    return 0 if worst <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
