"""Signals and late failures lose nothing: real CLI processes stopped by SIGTERM and Ctrl-C,
a data loader failing after the search, and the API's temporary model file on every way out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = ["probe", "bsfinder.examples:SmallCNN", "--input", "3x32x32", "--memory-limit", "256MiB"]


class Cli:
    """``python -m bsfinder ARGS`` with its stderr read line by line, and every process it
    starts (worker, trial processes) noted while it runs."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bsfinder", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self.descendants: dict[int, psutil.Process] = {}
        self._done = threading.Event()
        self._readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._watch, daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def _watch(self) -> None:
        try:
            me = psutil.Process(self.proc.pid)
            while not self._done.is_set() and self.proc.poll() is None:
                for child in me.children(recursive=True):
                    self.descendants.setdefault(child.pid, child)
                time.sleep(0.02)
        except psutil.NoSuchProcess:
            pass

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_for(self, ready: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.stderr}"
            assert time.monotonic() < deadline, f"timed out; stderr so far: {self.stderr}"
            time.sleep(0.01)

    def trials_seen(self) -> int:
        return sum(1 for line in list(self.lines) if line.lstrip().startswith("trial "))

    def worker_started(self) -> bool:
        return any(_is_worker(p) for p in list(self.descendants.values()))

    def torch_loading(self) -> bool:
        """torch's library is being mapped into the CLI process: it is importing torch."""
        try:
            with open(f"/proc/{self.proc.pid}/maps") as maps:
                return "libtorch" in maps.read()
        except OSError:
            return False

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        assert self.proc.stdout is not None
        stdout = self.proc.stdout.read()  # stderr is the reader thread's
        self.proc.wait(timeout=timeout)
        self._done.set()
        for t in self._readers:
            t.join(timeout=5)
        return self.proc.returncode, stdout, self.stderr

    def left_alive(self, grace_s: float = 3.0) -> list[str]:
        """The processes it started that still run (after a short grace period)."""
        deadline = time.monotonic() + grace_s
        while True:
            alive = [p for p in self.descendants.values() if _running(p)]
            if not alive or time.monotonic() > deadline:
                return [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in alive if _running(p)]
            time.sleep(0.1)


def _is_worker(p: psutil.Process) -> bool:
    try:
        return "bsfinder.execution._worker" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "Aborted!" not in stderr
    return lines[0]


def test_sigterm_mid_probe_writes_the_partial_json_and_exits_143(tmp_path) -> None:
    out = tmp_path / "partial.json"
    cli = Cli([*PROBE, "--json", str(out)], cwd=tmp_path)
    cli.wait_for(lambda: cli.trials_seen() >= 2)
    assert cli.worker_started()
    cli.proc.send_signal(signal.SIGTERM)
    code, stdout, stderr = cli.finish()
    assert code == 143, stderr
    data = json.loads(out.read_text())
    assert data["interrupted"] is True
    assert len(data["trials"]) >= 2 and all(t["fits"] for t in data["trials"][:2])
    assert data["recommendations"]["max_batch"] is not None
    assert "interrupted" in stdout and "Traceback" not in stderr
    # no worker or trial process outlives the CLI
    assert cli.left_alive() == []


@pytest.mark.parametrize(
    "second", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)]
)
def test_a_second_signal_still_writes_the_json(tmp_path, second) -> None:
    out = tmp_path / "partial.json"
    cli = Cli([*PROBE, "--json", str(out)], cwd=tmp_path)
    cli.wait_for(lambda: cli.trials_seen() >= 2)
    cli.proc.send_signal(signal.SIGINT)
    time.sleep(0.005)  # a double Ctrl-C: the second lands while the first is being handled
    cli.proc.send_signal(second)
    code, _, stderr = cli.finish()
    assert code == 130, stderr  # the first signal decides
    data = json.loads(out.read_text())
    assert data["interrupted"] is True and len(data["trials"]) >= 2
    assert "Traceback" not in stderr and "Aborted!" not in stderr
    assert cli.left_alive() == []


SLOW_STOP = '''
import os, time
import torch
from torch import nn


class SlowToStop(nn.Module):
    """Each forward takes 0.5 s (and says so in a file); a Ctrl-C inside it takes 1 s more
    to unwind (a model whose cleanup is slow), and says so in a marker file."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        open(os.environ["STOP_MARKER"] + ".forward", "w").close()
        try:
            time.sleep(0.5)
        except KeyboardInterrupt:
            open(os.environ["STOP_MARKER"], "w").close()
            time.sleep(1.0)
            raise
        return self.lin(x)
'''


def test_a_second_signal_during_a_slow_stop_waits_for_the_json(tmp_path) -> None:
    # GIVEN an inline probe whose model takes a second to unwind from a Ctrl-C
    (tmp_path / "slowstop.py").write_text(SLOW_STOP)
    marker, out = tmp_path / "stopping", tmp_path / "partial.json"
    cli = Cli(["probe", "slowstop.py:SlowToStop", "--input", "8", "--device", "cpu",
               "--memory-limit", "1GiB", "--isolation", "inline", "--json", str(out)],
              cwd=tmp_path, env={"STOP_MARKER": str(marker)})  # fmt: skip
    forward = tmp_path / "stopping.forward"
    cli.wait_for(lambda: cli.trials_seen() >= 1)
    forward.unlink()
    cli.wait_for(forward.exists)  # the next forward has begun
    # WHEN Ctrl-C inside the model's forward, and SIGTERM while the first is being handled
    time.sleep(0.1)
    cli.proc.send_signal(signal.SIGINT)
    cli.wait_for(marker.exists, timeout=10)
    cli.proc.send_signal(signal.SIGTERM)
    code, _, stderr = cli.finish()
    # THEN the second is held until what was measured is written
    assert code == 130, stderr
    assert "still stopping: writing what was measured first" in stderr
    data = json.loads(out.read_text())
    assert data["interrupted"] is True and len(data["trials"]) >= 1
    assert "Traceback" not in stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_exits_128_plus_n_with_one_line(tmp_path, signum) -> None:
    out = tmp_path / "r.json"
    cli = Cli([*PROBE, "--json", str(out)], cwd=tmp_path)
    cli.wait_for(cli.worker_started)
    assert "probing" not in cli.stderr  # before the first trial
    # the CLI itself does not import torch (a second of every probe's start on 2 cores):
    # the worker does
    assert not cli.torch_loading()
    cli.proc.send_signal(signum)
    code, stdout, stderr = cli.finish()
    assert code == 128 + signum, stderr
    line = _one_line(stderr)
    assert line.startswith(f"interrupted by {signal.Signals(signum).name}"), line
    assert "nothing" in line and not out.exists() and stdout == ""
    assert cli.left_alive() == []


LOADERS = """
import torch


def failing(batch_size):
    raise RuntimeError("the disk is gone")


def one_channel(batch_size):  # images the model cannot take: it raises on them
    for _ in range(40):
        yield torch.randn(batch_size, 1, 32, 32), torch.randint(0, 10, (batch_size,))
"""


@pytest.mark.parametrize(
    ("loader", "code", "says"),
    [("failing", 2, ("the data loader make_loader(", ") raised RuntimeError: the disk is gone")),
     pytest.param("one_channel", 1, ("the model raised RuntimeError",), marks=pytest.mark.slow)],
)  # fmt: skip
def test_a_failure_after_the_search_keeps_the_trials(tmp_path, loader, code, says) -> None:
    (tmp_path / "loaders.py").write_text(LOADERS)
    out = tmp_path / "r.json"
    cli = Cli([*PROBE, "--max-batch", "4", "--loss", "cross-entropy",
               "--data", f"loaders.py:{loader}", "--json", str(out)], cwd=tmp_path)  # fmt: skip
    rc, stdout, stderr = cli.finish(timeout=120)
    # THEN the CLI fails with the error in one line ...
    assert rc == code, stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), stderr
    assert all(fragment in errors[0] for fragment in says), stderr
    assert "Traceback" not in stderr
    # ... and the trials and the recommendations by the throughput knee are written
    data = json.loads(out.read_text())
    assert [t["batch_size"] for t in data["trials"]] == [1, 4]
    rec = data["recommendations"]
    assert rec["max_batch"] == 4 and rec["time_optimal_batch"] is not None
    assert rec["time_optimal_basis"] == "throughput" and rec["noise_scale"] is None
    notes = [n for n in data["notes"] if "noise scale was not measured" in n]
    assert len(notes) == 1 and all(fragment in notes[0] for fragment in says)
    assert "noise scale was not measured" in stdout and data["interrupted"] is False


def _model_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("bsfinder-model-*.pt"))


@pytest.fixture
def own_tmp(tmp_path, monkeypatch) -> Path:
    """A temporary directory of the test's own for tempfile (``TMPDIR``)."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def test_the_temporary_model_file_goes_when_the_save_is_interrupted(own_tmp) -> None:
    from torch import nn

    from bsfinder import find_batch_size

    class CtrlCWhilePickled:  # a Ctrl-C that arrives while the model is being written
        def __reduce__(self):
            raise KeyboardInterrupt

    model = nn.Linear(8, 8)
    model.extra = CtrlCWhilePickled()  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        find_batch_size(model, input_shape=(8,), device="cpu", memory_limit="64MiB")
    assert _model_files(own_tmp) == []


def test_the_temporary_model_file_goes_when_the_probe_fails(own_tmp) -> None:
    from bsfinder import UserCodeError, find_batch_size
    from tests.models import BrokenAt

    seen: list[list[str]] = []
    with pytest.raises(UserCodeError, match="at batch 4"):
        find_batch_size(BrokenAt(), input_shape=(8,), device="cpu", memory_limit="64MiB",
                        isolation="process",
                        on_event=lambda e: seen.append(_model_files(own_tmp)))  # fmt: skip
    assert seen and all(len(files) == 1 for files in seen)  # it was there while trials ran
    assert _model_files(own_tmp) == []


API_SCRIPT = """
import sys
from bsfinder import find_batch_size
from bsfinder.examples import SmallCNN


def progress(event):
    if event.kind == "trial-done":
        print("trial", event.index, flush=True, file=sys.stderr)


result = find_batch_size(SmallCNN(), input_shape=(3, 32, 32), device="cpu",
                         memory_limit="256MiB", on_event=progress)
print("interrupted", result.interrupted, len(result.trials), flush=True)
"""


def test_the_temporary_model_file_goes_when_a_script_is_interrupted(tmp_path) -> None:
    (tmp_path / "probe_it.py").write_text(textwrap.dedent(API_SCRIPT))
    own = tmp_path / "tmp"
    own.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "probe_it.py"], cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(own)},
    )  # fmt: skip
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + 60
    while "trial 2" not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += proc.stderr.readline()
    assert len(_model_files(own)) == 1  # the model travels to the trials in this file
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert stdout.startswith("interrupted True")
    assert _model_files(own) == []


@pytest.mark.parametrize(
    ("command", "signum"),
    [("profile", signal.SIGTERM), ("profile", signal.SIGINT), ("estimate", signal.SIGINT)],
)
def test_profile_and_estimate_stop_with_one_line(tmp_path, command, signum) -> None:
    args = ["bsfinder.examples:SmallCNN", "--input", "3x32x32"]
    if command == "profile":
        args += ["--batch", "8", "--memory-limit", "256MiB"]
    else:
        args += ["--target", "cpu", "--target-memory", "1GiB"]
    cli = Cli([command, *args, "--json", str(tmp_path / "r.json")], cwd=tmp_path)
    cli.wait_for(cli.worker_started if command == "profile" else cli.torch_loading)
    if command == "estimate":
        time.sleep(0.5)
    cli.proc.send_signal(signum)
    code, stdout, stderr = cli.finish()
    assert (code, stdout) == (128 + signum, ""), stderr
    line = _one_line(stderr)
    assert (
        line == f"interrupted by {signal.Signals(signum).name}: {command} stopped, nothing written"
    )
    assert not (tmp_path / "r.json").exists()
    assert cli.left_alive() == []


def test_a_signal_handler_holds_the_second_signal() -> None:
    from bsfinder.cli._signals import _Stop

    stop = _Stop()
    with pytest.raises(KeyboardInterrupt):
        stop(signal.SIGTERM, None)
    stop(signal.SIGINT, None)  # held: no second KeyboardInterrupt
    assert stop.exit_code == 143 and stop.name == "SIGTERM"
    stop._first_at -= stop.RESTOP_S + 1  # the first was lost (a finalizer ate it): stop again
    with pytest.raises(KeyboardInterrupt):
        stop(signal.SIGINT, None)
    assert stop.exit_code == 143  # the first signal still decides
    holding = _Stop()
    holding.holding = True
    holding(signal.SIGINT, None)  # the result is being written: only remembered
    assert holding.exit_code == 130


def test_sigterm_in_the_lr_range_test_keeps_the_probe_and_the_curve_so_far(tmp_path) -> None:
    # GIVEN a probe with data whose range test runs at 0.1 s a step (tests.models)
    out = tmp_path / "partial.json"
    args = [
        "probe", "tests.models:fixed_regression_model", "--input", "16", "--input", "1",
        "--data", "tests.models:slow_regression_loader", "--optimizer", "sgd",
        "--max-batch", "16", "--memory-limit", "128MiB", "--json", str(out),
    ]  # fmt: skip
    cli = Cli(args, cwd=ROOT)
    # WHEN SIGTERM comes once the range test has run a few steps (its first step's line, not
    # a fixed wait: under a full suite its process's start-up took over the 4 s this slept)
    cli.wait_for(lambda: "LR range test  step 1/" in cli.stderr, timeout=120)
    time.sleep(0.5)  # a few more steps, at 0.1 s each
    cli.proc.send_signal(signal.SIGTERM)
    code, _stdout, stderr = cli.finish()
    # THEN the probe's trials and the range test's steps so far are written, exit 143
    assert code == 143, stderr
    data = json.loads(out.read_text())
    assert data["interrupted"] is True and data["recommendations"]["max_batch"] == 16
    found = data["recommendations"]["lr_range"]
    assert found["interrupted"] and found["curve"]["stopped"] == "interrupted"
    assert 0 < len(found["curve"]["lrs"]) < 100
    assert data["recommendations"]["learning_rate"] is None  # no LR read from half a sweep
    assert any("LR range test was interrupted" in note for note in data["notes"])
    assert cli.left_alive() == []
