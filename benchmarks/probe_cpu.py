"""Probe three models under one CPU budget; check the answer in fresh processes.

    python benchmarks/probe_cpu.py                 # full: 3 models, writes benchmarks/results/
    python benchmarks/probe_cpu.py --smoke         # CI: one small model, a minute

For each model: trials, wall seconds, the largest batch found, the time in timed steps
(overhead = wall / timed), and whether the found batch fits and found + granularity does
not, each in a brand-new process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, fresh_fits, header  # noqa: E402
from bsfinder import find_batch_size  # noqa: E402
from bsfinder.loading import parse_input_spec  # noqa: E402
from bsfinder.results import write_json_atomic  # noqa: E402
from bsfinder.units import format_bytes  # noqa: E402
from bsfinder.workload import WorkloadSpec  # noqa: E402

MODELS = {
    "small-cnn": {"model": "bsfinder.examples:SmallCNN", "inputs": ["3x32x32"], "kwargs": {}},
    "mlp": {
        "model": "bsfinder.examples:MLP",
        "inputs": ["1024"],
        "kwargs": {"in_features": 1024, "hidden": 2048, "depth": 2},
    },
    "gpt2": {
        "model": f"{ROOT}/examples/hf_models.py:gpt2",
        "inputs": ["input_ids=128:int64:50257", "labels=128:int64:50257"],
        "kwargs": {"n_layer": 2, "n_embd": 128},
    },
}


def run(name: str, budget: int, granularity: int) -> dict:
    cfg = MODELS[name]
    started = time.perf_counter()
    result = find_batch_size(
        cfg["model"],
        inputs=cfg["inputs"],
        model_kwargs=cfg["kwargs"],
        device="cpu",
        memory_limit=budget,
        granularity=granularity,
        warmup_steps=1,
        steps=2,
    )
    wall = time.perf_counter() - started
    found = result.max_batch
    spec = WorkloadSpec(
        model=cfg["model"],
        model_kwargs=cfg["kwargs"],
        inputs=tuple(parse_input_spec(s) for s in cfg["inputs"]),
    )
    row = {
        "model": name,
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
        "fresh_found_fits": fresh_fits(spec, found, budget) if found else None,
        "fresh_next_fits": fresh_fits(spec, found + granularity, budget) if found else None,
        "runner": result.runner,
    }
    print(
        f"{name:<10} budget {format_bytes(budget)}: {row['trials']} trials, {row['wall_s']} s "
        f"(timed steps {row['timed_steps_s']} s), found {found}; fresh process: {found} "
        f"{'fits' if row['fresh_found_fits'] else 'FAILS'}, {found + granularity} "
        f"{'FITS' if row['fresh_next_fits'] else 'fails'}",
        flush=True,
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one small model (CI)")
    parser.add_argument("--budget", default=str(512 * 2**20), help="bytes (default 512 MiB)")
    parser.add_argument("--granularity", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu-probe.json"))
    args = parser.parse_args()
    names = ["small-cnn"] if args.smoke else list(MODELS)
    budget = 256 * 2**20 if args.smoke else int(args.budget)
    rows = [run(name, budget, args.granularity) for name in names]
    write_json_atomic(args.out, json.dumps({"header": header(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    exact = all(r["fresh_found_fits"] and not r["fresh_next_fits"] for r in rows)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
