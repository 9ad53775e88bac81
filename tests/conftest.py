from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Idle OpenMP threads sleep instead of spinning. Two pytest workers each start trial processes
# with torch's full thread count on 2 cores, and spinning threads took the CPU the other
# trials needed: the fast tier took 5 min 00 s spinning, 3 min 40 s passive. How a thread
# waits changes no answer a test checks. Set before torch loads (libgomp reads it then); the
# trial processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# A test run started in the background (`./.ci/run &` in a script) inherits SIGINT ignored,
# and so does every process a test starts: a script under test then never sees its Ctrl-C
# (measured: "interrupted False 6" where the test sent SIGINT after trial 2). With a handler
# here, the processes the tests start get SIGINT's default back at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from bsfinder.execution.process import check_batch  # after the OpenMP policy: imports torch
from bsfinder.workload.step import WorkloadSpec

ROOT = Path(__file__).resolve().parent.parent


def fresh_trial(
    spec: WorkloadSpec, batch: int, budget: int, *, steps: int = 3, device: str = "cpu"
) -> bool:
    """Does ``batch`` train in a brand-new process under ``budget``? (one trial, one worker)"""
    return check_batch(spec, batch, device=device, memory_limit_bytes=budget, steps=steps).fits


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


def invoke_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``bsfinder ARGS`` in this process through click's ``CliRunner``: what ``run_cli`` gives
    (exit code, stdout, stderr) without a fresh interpreter importing torch (1.7 s a call on 2
    cores). A probe's trials still run in real worker processes. An exception that escapes the
    CLI fails the test, as its traceback would fail a subprocess's checks; and the CLI must
    leave the SIGINT and SIGTERM handlers as it found them."""
    from click.testing import CliRunner

    from bsfinder.cli import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    before = os.getcwd()  # contextlib.chdir is Python 3.11+; bsfinder supports 3.10
    os.chdir(cwd or ROOT)
    try:
        result = CliRunner(env={"NO_COLOR": "1"}).invoke(main, list(args), catch_exceptions=False)
    finally:
        os.chdir(before)
    assert {s: signal.getsignal(s) for s in handlers} == handlers, "signal handlers changed"
    return subprocess.CompletedProcess(
        ["bsfinder", *args], result.exit_code, result.stdout, result.stderr
    )


@pytest.fixture
def cli():
    """The CLI in this process (:func:`invoke_cli`); tests whose point is the process boundary
    (signals, stdout, a fresh interpreter) call :func:`run_cli`."""
    return invoke_cli
