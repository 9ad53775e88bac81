"""Probe three models under one memory budget; check the answer in fresh processes.

    python benchmarks/probe.py                     # CPU, 512 MiB: writes results/cpu-probe.json
    python benchmarks/probe.py --smoke             # CI: one small model, ~20 s
    python benchmarks/probe.py --device cuda --budget 8GiB   # GPU: results/gpu-probe.json

For each model: trials, wall seconds, the largest batch found, the time in timed steps
(overhead = wall / timed), and whether the found batch fits and the next size the search saw
fail (found + granularity) does not, each in a brand-new process. The full run also probes
each model with plain bisection (no memory line), side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, fresh_fits, header
from bsfinder import find_batch_size
from bsfinder.core.results import write_text_atomic
from bsfinder.units import format_bytes, parse_bytes
from bsfinder.workload.loading import parse_input_spec
from bsfinder.workload.step import WorkloadSpec

MODELS = {
    "small-cnn": {"model": "bsfinder.examples:SmallCNN", "inputs": ["3x32x32"], "kwargs": {}},
    "mlp": {
        "model": "bsfinder.examples:MLP",
        "inputs": ["1024"],
        "kwargs": {"in_features": 1024, "hidden": 2048, "depth": 2},
    },
    "gpt2": {
        "model": f"{ROOT}/examples/hf_models.py:gpt2",
        "inputs": ["input_ids=128:int64:8192", "labels=128:int64:8192"],
        "kwargs": {"n_layer": 2, "n_embd": 128, "vocab_size": 8192},
    },
}


def probe(name: str, budget: int, granularity: int, device: str, memory_model: bool) -> Any:
    cfg = MODELS[name]
    return find_batch_size(
        cfg["model"],
        inputs=cfg["inputs"],
        model_kwargs=cfg["kwargs"],
        device=device,
        memory_limit=budget,
        granularity=granularity,
        warmup_steps=1,
        steps=2,
        memory_model=memory_model,
        time_limit=None,  # the whole search, however long (the comparison is of searches)
    )


def run(name: str, budget: int, granularity: int, device: str, compare: bool) -> dict:
    cfg = MODELS[name]
    started = time.perf_counter()
    result = probe(name, budget, granularity, device, memory_model=True)
    wall = time.perf_counter() - started
    found = result.max_batch
    # the next size the search tried and saw fail: found + granularity, or the next power of
    # two when the answer is below the granularity
    failed = result.recommendations.first_failure
    spec = WorkloadSpec(
        model=cfg["model"],
        model_kwargs=cfg["kwargs"],
        inputs=tuple(parse_input_spec(s) for s in cfg["inputs"]),
    )
    row = {
        "model": name,
        "device": result.device,
        "budget_bytes": budget,
        "granularity": granularity,
        "trials": len(result.trials),
        "tried": [(t.batch_size, t.fits) for t in result.trials],
        "wall_s": round(wall, 2),
        "timed_steps_s": round(result.trial_seconds, 2),
        "overhead_ratio": round(wall / result.trial_seconds, 2) if result.trial_seconds else None,
        "found": found,
        "time_optimal": result.time_optimal_batch,
        "found_peak_bytes": result.trial(found).peak_bytes if found else None,
        "fresh_found_fits": fresh_fits(spec, found, budget, device) if found else None,
        "first_failure": failed,
        "fresh_next_fits": fresh_fits(spec, failed, budget, device) if failed else None,
        "runner": result.runner,
    }
    if compare:  # the same search with plain bisection instead of the fitted memory line
        started = time.perf_counter()
        plain = probe(name, budget, granularity, device, memory_model=False)
        row["bisection"] = {
            "trials": len(plain.trials),
            "tried": [(t.batch_size, t.fits) for t in plain.trials],
            "wall_s": round(time.perf_counter() - started, 2),
            "found": plain.max_batch,
        }
    print(
        f"{name:<10} budget {format_bytes(budget)}: {row['trials']} trials, {row['wall_s']} s "
        f"(timed steps {row['timed_steps_s']} s), found {found}; fresh process: {found} "
        f"{'fits' if row['fresh_found_fits'] else 'FAILS'}, {failed} "
        f"{'FITS' if row['fresh_next_fits'] else 'fails'}",
        flush=True,
    )
    if compare:
        b = row["bisection"]
        print(f"{'':<10} bisection: {b['trials']} trials, {b['wall_s']} s, found {b['found']}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one small model (CI)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--budget", default="512MiB", help="CPU budget or GPU cap (512MiB)")
    parser.add_argument("--granularity", type=int, default=8)
    parser.add_argument("--out", default=None, help="default: results/{cpu,gpu}-probe.json")
    args = parser.parse_args()
    names = ["small-cnn"] if args.smoke else list(MODELS)
    budget = 256 * 2**20 if args.smoke else parse_bytes(args.budget)
    kind = "cpu" if args.device == "cpu" else "gpu"
    args.out = args.out or str(ROOT / f"benchmarks/results/{kind}-probe.json")
    rows = [run(name, budget, args.granularity, args.device, not args.smoke) for name in names]
    write_text_atomic(args.out, json.dumps({"header": header(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    exact = all(r["fresh_found_fits"] and not r["fresh_next_fits"] for r in rows)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
