"""Rerun one probe five times beside a CPU-bound process; does the time-optimal batch hold?

    python benchmarks/stability.py          # SmallCNN, 512 MiB, 5 runs: results/cpu-stability.json
    python benchmarks/stability.py --smoke  # 2 short runs, under 30 s (writes to /tmp)

Each run probes the same model with a Python busy loop running in a subprocess beside it
(started before, stopped after, by this script), and records the time-optimal batch, whether
it was flagged noisy (and the range reruns may give), the agreement of the bootstrap and the
step-time spread. Done means: the unflagged answers all agree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, header
from bsfinder import find_batch_size
from bsfinder.core.results import write_text_atomic
from bsfinder.units import parse_bytes

#: the load: one core's worth of pure-Python spinning, as another user's job would be
BUSY_LOOP = "while True: pass"


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    load = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if args.load else None
    started = time.perf_counter()
    try:
        result = find_batch_size(
            "bsfinder.examples:SmallCNN",
            inputs=[args.input],
            memory_limit=parse_bytes(args.budget),
            max_batch=args.max_batch,
            granularity=8,
            warmup_steps=1,
            steps=args.steps,
        )
    finally:
        if load is not None:
            load.terminate()
            load.wait()
    rec = result.recommendations
    return {
        "wall_s": round(time.perf_counter() - started, 2),
        "trials": len(result.trials),
        "max_batch": result.max_batch,
        "time_optimal": rec.time_optimal_batch,
        "noisy": rec.time_optimal_noisy,
        "noise_range": rec.time_optimal_noise_range,
        "agreement": rec.time_optimal_agreement,
        "step_time_spread": rec.step_time_spread,
        "throughput_model": rec.throughput_model,
        "timed": [(t.batch_size, t.step_times_s) for t in result.trials if t.timed],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 short runs (CI), under 30 s")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--input", default="3x32x32")
    parser.add_argument("--budget", default="512MiB")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-load", dest="load", action="store_false", help="no busy loop")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu-stability.json"))
    args = parser.parse_args()
    args.max_batch = None
    if args.smoke:
        args.runs, args.input, args.budget, args.max_batch = 2, "3x16x16", "256MiB", 16
        args.steps = 2
        args.out = "/tmp/cpu-stability-smoke.json"
    runs = []
    for i in range(args.runs):
        row = run_once(args)
        runs.append(row)
        flag = f"noisy {row['noise_range']}" if row["noisy"] else "stable"
        spread = row["step_time_spread"]
        print(
            f"run {i + 1}: time-optimal {row['time_optimal']} ({flag}, agreement "
            f"{row['agreement']}), step spread {spread if spread is None else round(spread, 3)}, "
            f"{row['trials']} trials in {row['wall_s']} s",
            flush=True,
        )
    unflagged = {r["time_optimal"] for r in runs if not r["noisy"]}
    summary = {
        "runs": len(runs),
        "unflagged_answers": sorted(unflagged),
        "flagged": sum(r["noisy"] for r in runs),
        "consistent": len(unflagged) <= 1,
    }
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    out = {"header": header(), "settings": settings, "summary": summary, "rows": runs}
    write_text_atomic(args.out, json.dumps(out, indent=2))
    print(f"{summary}\nwrote {args.out}")
    return 0 if summary["consistent"] else 1


if __name__ == "__main__":
    sys.exit(main())
