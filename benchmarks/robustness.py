"""Hostile user code, probed by the real CLI: what each case ends in, and in how long.

    python benchmarks/robustness.py                  # writes results/cpu-robustness.json
    python benchmarks/robustness.py --before ../old  # also an older checkout, side by side
    python benchmarks/robustness.py --smoke          # CI: two cases, ~30 s

Each case is one ``bsfinder probe`` in a fresh process under a 256 MiB CPU budget with
``--trial-timeout 30``, on a model from ``tests/hostile/`` that misbehaves as user code does:
a parallel torch op or a thread at import, Keras 3 on the torch backend, a crash (SIGSEGV,
``os._exit``), or a hang at batch 16 or at every batch, and a crash that *is* memory (C code
aborting where an allocation fails). Recorded: exit code, wall seconds, the largest batch in
the JSON (if one was written), the last line on stderr, and how the worker imported the
user's code (once in the fork server, or in every trial process) with the per-trial set-up
seconds that cost.
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
from bsfinder.core.results import write_text_atomic

HOSTILE = ROOT / "tests" / "hostile"


def _misbehave(how: str, at: int) -> list[str]:
    return [
        f"{HOSTILE}/misbehave.py:Misbehave",
        "--model-kwargs",
        json.dumps({"how": how, "at": at}),
        "--input",
        "64",
    ]


CASES: dict[str, list[str]] = {
    "parallel op at import": [f"{HOSTILE}/parallel_at_import.py:Net", "--input", "64"],
    "thread at import": [f"{HOSTILE}/thread_at_import.py:Net", "--input", "64"],
    "keras 3 (torch backend)": [f"{HOSTILE}/keras_model.py:make_model", "--input", "64"],
    "SIGSEGV at batch 16": _misbehave("segv", 16),
    "os._exit(3) at batch 16": _misbehave("exit", 16),
    "hang at batch 16": _misbehave("hang", 16),
    "SIGSEGV at every batch": _misbehave("segv", 0),
    "hang at every batch": _misbehave("hang", 0),
    "abort where memory runs out": _misbehave("abort_if_oom", 0),
    "GPT-2 module with a thread at import": [
        f"{HOSTILE}/hf_thread.py:gpt2",
        "--input",
        "input_ids=64:int64:4096",
        "--input",
        "labels=64:int64:4096",
    ],
}
SMOKE = ("parallel op at import", "SIGSEGV at batch 16")


def run_case(code: Path, args: list[str], timeout_s: float) -> dict[str, Any]:
    """One probe of ``args`` with the bsfinder in ``code``, in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": str(code), "KERAS_BACKEND": "torch"}
        limits = ["--memory-limit", "256MiB", "--max-batch", "64", "--trial-timeout", "30"]
        command = [sys.executable, "-m", "bsfinder", "probe", *args, *limits, "--json", str(out)]
        started = time.perf_counter()
        try:
            done = subprocess.run(
                command, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout_s
            )
            code_, stderr = done.returncode, done.stderr
        except subprocess.TimeoutExpired as exc:
            code_, stderr = None, (exc.stderr or b"").decode() if exc.stderr else ""
        wall = time.perf_counter() - started
        record: dict[str, Any] = {"exit_code": code_, "wall_s": round(wall, 1)}
        lines = [line for line in stderr.splitlines() if line.strip()]
        record["last_line"] = lines[-1][:300] if lines else ""
        if out.exists():
            result = json.loads(out.read_text())
            runner = result.get("runner", {})
            processes = max(1, runner.get("trial_processes", 1))
            record.update(
                max_batch=result["recommendations"]["max_batch"],
                trials=len(result["trials"]),
                failures=sorted({t["failure"] for t in result["trials"] if not t["fits"]}),
                imports=runner.get("imports", "once"),
                setup_s_per_trial=round(runner.get("trial_setup_s", 0.0) / processes, 3),
                server_start_s=runner.get("server_start_s"),
            )
        return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="an older checkout to run side by side")
    parser.add_argument("--smoke", action="store_true", help="two cases, for CI")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu-robustness.json")
    parser.add_argument("--timeout", type=float, default=600.0, help="per case, seconds")
    args = parser.parse_args()
    names = SMOKE if args.smoke else tuple(CASES)
    codes = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    cases: dict[str, Any] = {}
    for name in names:
        cases[name] = {}
        for label, code in codes.items():
            record = run_case(code, CASES[name], args.timeout)
            cases[name][label] = record
            print(f"{name:38s} {label:6s} {json.dumps(record)}", flush=True)
    if args.smoke:
        after = cases["parallel op at import"]["after"]
        assert after["exit_code"] == 0 and after["max_batch"] == 64, after
        crash = cases["SIGSEGV at batch 16"]["after"]
        assert crash["exit_code"] == 1 and "SIGSEGV at batch 16" in crash["last_line"], crash
    write_text_atomic(args.out, json.dumps({"header": header(), "cases": cases}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
