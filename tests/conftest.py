from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bsfinder.execution.process import check_batch
from bsfinder.workload.step import WorkloadSpec

ROOT = Path(__file__).resolve().parent.parent


def fresh_trial(
    spec: WorkloadSpec, batch: int, budget: int, *, steps: int = 3, device: str = "cpu"
) -> bool:
    """Does ``batch`` train in a brand-new process under ``budget``? (one trial, one worker)"""
    return check_batch(spec, batch, device=device, budget_bytes=budget, steps=steps).fits


def run_cli(
    *args: str, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
    return subprocess.run(
        [sys.executable, "-m", "bsfinder", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd or ROOT,
    )


@pytest.fixture
def cli():
    return run_cli
