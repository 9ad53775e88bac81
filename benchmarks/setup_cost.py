"""Per-trial set-up against one training step, on a model of about a billion parameters.

    python benchmarks/setup_cost.py            # CPU, 1.0 B parameters: results/cpu-setup-cost.json
    python benchmarks/setup_cost.py --smoke    # CI: a small stack, ~15 s

A stack of bias-free ``nn.Linear(8192, 8192)`` layers (15 of them: 1.01 B parameters, 3.75 GiB
in fp32; SGD with momentum, so a trial holds weights + gradients + momentum, 11.3 GiB) runs a
few trials at a small batch through the real :class:`~bsfinder.execution.process.ProcessRunner`.
For each trial: the set-up seconds the trial process reports (from the fork to the model on
the device: warm-up, the budget, the build), the trial's wall seconds, and one timed step's
seconds; and the server's start-up seconds. ``--compare`` also runs the same trials with the
model built in every trial process (the runner's internal ``prebuild = False``), side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import ROOT, header
from bsfinder.core.results import write_text_atomic
from bsfinder.execution.process import ProcessRunner
from bsfinder.units import format_bytes, parse_bytes
from bsfinder.workload.loading import parse_input_spec
from bsfinder.workload.step import WorkloadSpec


class LinearStack(torch.nn.Module):
    """``depth`` bias-free ``width x width`` linear layers with ReLUs in between."""

    def __init__(self, width: int = 8192, depth: int = 15) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for i in range(depth):
            layers.append(torch.nn.Linear(width, width, bias=False))
            if i < depth - 1:
                layers.append(torch.nn.ReLU())
        self.layers = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def measure(
    width: int, depth: int, batch: int, trials: int, budget: int, prebuild: bool | None
) -> dict[str, Any]:
    """Start a runner, run ``trials`` trials at ``batch``; what each cost.

    ``prebuild``: the runner's internal switch (None: the runner's default, for a tree that
    has no such switch).
    """
    spec = WorkloadSpec(
        model=f"{Path(__file__).resolve()}:LinearStack",
        model_kwargs={"width": width, "depth": depth},
        inputs=(parse_input_spec(str(width)),),
        optimizer="sgd",
        precision="32",
    )
    runner = ProcessRunner(spec, device="cpu", memory_limit_bytes=budget, warmup_steps=1, steps=1)
    if prebuild is not None:
        runner.prebuild = prebuild
    rows: list[dict[str, Any]] = []
    setups: list[float] = []
    steps: list[float] = []
    try:
        started = time.perf_counter()
        info = runner.start()
        start_s = time.perf_counter() - started
        server_start_s = runner.stats()["server_start_s"]
        for _ in range(trials):
            before = runner.setup_s
            marks: list[float] = []

            def mark(done: int, total: int, marks: list[float] = marks) -> None:
                marks.append(time.perf_counter())

            begun = time.perf_counter()
            trial = runner.run_trial(batch, mark)
            ended = time.perf_counter()
            setup_s = runner.setup_s - before
            step_s = trial.step_times_s[0] if trial.step_times_s else None
            setups.append(setup_s)
            if step_s is not None:
                steps.append(step_s)
            rows.append(
                {
                    "batch_size": batch,
                    "fits": trial.fits,
                    "setup_s": round(setup_s, 3),
                    "step_s": round(step_s, 3) if step_s is not None else None,
                    "wall_s": round(trial.wall_s or 0.0, 3),
                    # from the request to the end of the untimed first step (fork, set-up,
                    # the step that creates gradients and optimizer state), and from the end
                    # of the last step to the answer (report, exit)
                    "to_first_step_s": round(marks[0] - begun, 3) if marks else None,
                    "after_last_step_s": round(ended - marks[-1], 3) if marks else None,
                    "peak_bytes": trial.peak_bytes,
                    "peak_rss_bytes": trial.peak_rss_bytes,
                    "failure": trial.failure,
                }
            )
            print(
                f"  batch {batch}: {'fits' if trial.fits else trial.failure}, set-up "
                f"{setup_s:.2f} s, step {step_s or float('nan'):.2f} s, wall "
                f"{trial.wall_s or 0:.2f} s, peak {format_bytes(trial.peak_bytes or 0)}",
                flush=True,
            )
        stats = runner.stats()
    finally:
        runner.close()
    return {
        "prebuild": prebuild,
        "start_s": round(start_s, 3),
        "server_start_s": server_start_s,
        "parameter_bytes": info.workload.get("parameter_bytes"),
        "trials": rows,
        "median_setup_s": round(statistics.median(setups), 3) if setups else None,
        "median_step_s": round(statistics.median(steps), 3) if steps else None,
        "setup_per_step": (
            round(statistics.median(setups) / statistics.median(steps), 3)
            if setups and steps
            else None
        ),
        "runner": stats,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a small stack (CI, ~15 s)")
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--depth", type=int, default=15)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--budget", default="14GiB", help="the CPU budget (14GiB)")
    parser.add_argument(
        "--compare", action="store_true", help="also build the model in every trial process"
    )
    parser.add_argument("--out", default=None, help="default: results/cpu-setup-cost.json")
    args = parser.parse_args()
    if args.smoke:
        args.width, args.depth, args.trials, args.budget = 1024, 4, 2, "512MiB"
    budget = parse_bytes(args.budget)
    default_out = "/tmp/bsfinder-setup-cost-smoke.json" if args.smoke else "cpu-setup-cost.json"
    args.out = args.out or str(ROOT / "benchmarks/results" / default_out)
    params = args.width * args.width * args.depth
    print(
        f"{args.depth} x Linear({args.width}, {args.width}): {params / 1e9:.2f} B parameters "
        f"({format_bytes(params * 4)} fp32), SGD, batch {args.batch}, budget "
        f"{format_bytes(budget)}",
        flush=True,
    )
    modes: list[bool | None] = [False, None] if args.compare else [None]
    runs = []
    for mode in modes:
        print("per-trial build:" if mode is False else "default:", flush=True)
        run = measure(args.width, args.depth, args.batch, args.trials, budget, mode)
        print(
            f"  server start {run['server_start_s']:.2f} s; set-up {run['median_setup_s']} s "
            f"per trial against a step of {run['median_step_s']} s",
            flush=True,
        )
        runs.append(run)
    result = {
        "header": header(),
        "model": {"width": args.width, "depth": args.depth, "parameters": params},
        "batch_size": args.batch,
        "budget_bytes": budget,
        "runs": runs,
    }
    write_text_atomic(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(r["fits"] for run in runs for r in run["trials"]) else 1


if __name__ == "__main__":
    sys.exit(main())
