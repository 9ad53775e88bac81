"""Accelerate's ``find_executable_batch_size`` next to bsfinder's decorator of the same name,
on one training function (benchmarks/accelerate_train.py) under one CPU budget.

    python benchmarks/integration_accelerate.py            # ~2-4 min on 2 cores
    python benchmarks/integration_accelerate.py \
        --out benchmarks/results/cpu-integration-accelerate.json

Each finder runs in its own fresh process. Accelerate's: imports and one call of the
function at batch 2 first (lazy imports, one-time set-up), then ``RLIMIT_AS`` = the address
space + the budget (``CpuBackend.apply_budget``, as bsfinder's trial processes and
benchmarks/finders.py), then ``accelerate.utils.find_executable_batch_size(
starting_batch_size=START)`` around the function: every attempt in that one process, 0.9x
after each out-of-memory error. bsfinder's: ``bsfinder.integrations.accelerate.
find_executable_batch_size(starting_batch_size=START, memory_limit=budget)``, whose trials
run in limited fresh processes. Each answer is then checked: the whole function at that
batch, alone in a brand-new process under the same budget
(``bsfinder.execution.process.check_batch``), and at the answer + the granularity.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import header

BUDGET = 256 * 2**20
START = 8192
GRANULARITY = 64
MAX_STEPS = 5


def _accelerate(job: dict[str, Any]) -> dict[str, Any]:
    from accelerate.utils import find_executable_batch_size

    from benchmarks.accelerate_train import train
    from bsfinder.devices.cpu import CpuBackend

    train(2, max_steps=2)  # lazy imports and one-time set-up, before the budget
    tried: list[list[Any]] = []

    def attempt(batch_size: int) -> int:
        try:
            train(batch_size, max_steps=MAX_STEPS)
        except BaseException as exc:
            tried.append([batch_size, False, f"{type(exc).__name__}: {str(exc)[:120]}"])
            raise
        tried.append([batch_size, True])
        return batch_size

    CpuBackend().apply_budget(job["budget"])
    started = time.perf_counter()
    try:
        found: int | None = find_executable_batch_size(attempt, starting_batch_size=START)()
        outcome = "ok"
    except Exception as exc:
        found, outcome = None, f"crashed: {type(exc).__name__}: {str(exc)[:200]}"
    return {"found": found, "outcome": outcome, "tried": tried,
            "search_s": time.perf_counter() - started}  # fmt: skip


def _bsfinder(job: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.accelerate_train import train
    from bsfinder.integrations.accelerate import find_executable_batch_size

    started = time.perf_counter()
    decorated = find_executable_batch_size(
        train, starting_batch_size=START, memory_limit=job["budget"], device="cpu",
        granularity=job["granularity"], time_limit=None,
    )  # fmt: skip
    result = decorated.probe(max_steps=MAX_STEPS)  # the probe alone: no training run after
    return {
        "found": result.max_batch,
        "outcome": "ok" if result.max_batch else "nothing fits",
        "tried": [[t.batch_size, t.fits] for t in result.trials],
        "search_s": time.perf_counter() - started,
    }


def worker(path: str) -> int:
    job = json.loads(Path(path).read_text())
    out = _accelerate(job) if job["finder"] == "accelerate" else _bsfinder(job)
    Path(job["result"]).write_text(json.dumps(out))
    return 0


def run(finder: str, budget: int, granularity: int) -> dict[str, Any]:
    from bsfinder.devices.cpu import allocator_env

    with tempfile.TemporaryDirectory(prefix="integration-accelerate-") as tmp:
        job = {"finder": finder, "budget": budget, "granularity": granularity,
               "result": os.path.join(tmp, "result.json")}  # fmt: skip
        job_path = os.path.join(tmp, "job.json")
        Path(job_path).write_text(json.dumps(job))
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", job_path], env={**os.environ, **allocator_env()},
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        if not os.path.exists(job["result"]):
            why = f"process died ({proc.returncode}): {proc.stderr[-400:]}"
            return {"finder": finder, "found": None, "process_s": round(elapsed, 2),
                    "outcome": why}  # fmt: skip
        out = json.loads(Path(job["result"]).read_text())
    label = finder if finder == "accelerate" else f"bsfinder (granularity {granularity})"
    return {"finder": label, **out, "trials": len(out["tried"]),
            "search_s": round(out["search_s"], 2), "process_s": round(elapsed, 2)}  # fmt: skip


def whole_run_fits(batch: int, budget: int) -> bool:
    from benchmarks.accelerate_train import train
    from bsfinder.execution.placement import _by_value
    from bsfinder.execution.process import check_batch
    from bsfinder.workload.step import WorkloadSpec

    blob, why = _by_value(functools.partial(train, max_steps=MAX_STEPS))
    assert blob is not None, why
    trial = check_batch(WorkloadSpec(train_step=blob), batch, device="cpu",
                        memory_limit_bytes=budget, warmup_steps=0, steps=1)  # fmt: skip
    return trial.fits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    rows = []
    for finder, granularity in (("accelerate", 1), ("bsfinder", GRANULARITY), ("bsfinder", 1)):
        row = run(finder, BUDGET, granularity)
        if row["found"]:
            row["fits_fresh"] = whole_run_fits(row["found"], BUDGET)
            row["next_fits_fresh"] = whole_run_fits(row["found"] + granularity, BUDGET)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        payload = {
            **header(),
            "budget_bytes": BUDGET, "starting_batch_size": START, "max_steps": MAX_STEPS,
            "function": "benchmarks/accelerate_train.py:train (64 -> 4096 -> 10 MLP, AdamW)",
            "rows": rows,
        }  # fmt: skip
        Path(args.out).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
