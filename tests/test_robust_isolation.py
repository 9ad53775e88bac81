"""Fresh-process trials for user code that breaks naive fork servers, and crashes or hangs
judged on evidence instead of being taken for "does not fit".

Every test runs real trial processes (the API starts a real worker); the models are in
tests/hostile/. Before (178d663): the import-time cases hung every trial for 900 s, a crash
or hang at batch 16 gave "largest that fits: 8" with exit 0.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bsfinder import find_batch_size
from bsfinder.errors import ModelCrashError, UserCodeError
from bsfinder.execution.process import ProcessRunner, worker_sys_path
from bsfinder.workload.step import WorkloadSpec

HOSTILE = Path(__file__).parent / "hostile"


def _probe(spec: str, **kwargs):
    options = {
        "input_shape": (64,),
        "device": "cpu",
        "memory_limit": "256MiB",
        "max_batch": 32,
        "steps": 1,
        "trial_timeout_s": 30,
        **kwargs,
    }
    return find_batch_size(f"{HOSTILE}/{spec}", **options)


def _misbehave(how: str, at: int, **kwargs):
    return _probe("misbehave.py:Misbehave", model_kwargs={"how": how, "at": at}, **kwargs)


# -- user code that runs torch ops or starts threads at import ---------------------------------
def test_parallel_op_at_import_does_not_hang_the_trials():
    # a hang would surface as a ModelCrashError after the 30 s no-progress limit
    result = _probe("parallel_at_import.py:Net")
    assert result.max_batch == 32
    assert result.runner["imports"] == "once"  # the server stayed single-threaded


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="needs keras")
def test_keras_model_on_the_torch_backend_probes_in_fresh_processes():
    started = time.perf_counter()
    result = _probe("keras_model.py:make_model")
    assert result.max_batch == 32
    assert result.runner["isolation"] == "process"
    assert result.runner["imports"] == "once"  # its jemalloc thread is no hazard (pandas)
    assert time.perf_counter() - started < 120


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
def test_jemallocs_background_thread_at_import_keeps_the_import_in_the_fork_server():
    # GIVEN a module whose import starts pyarrow's jemalloc thread (pandas, so Keras 3, does)
    import pyarrow  # noqa: F401

    from bsfinder.execution._worker import _threads

    if "jemalloc_bg_thd" not in _threads().values():
        pytest.skip("this pyarrow starts no jemalloc background thread")
    # WHEN it is probed, THEN the server forks every trial from its one import, and they train
    result = _probe("jemalloc_at_import.py:Net", input_shape=(16,))
    assert result.max_batch == 32 and all(t.fits for t in result.trials)
    assert result.runner["imports"] == "once"
    assert not any("afresh" in note for note in result.notes)


def test_a_thread_started_at_import_moves_imports_into_each_trial():
    result = _probe("thread_at_import.py:Net")
    assert result.max_batch == 32
    assert result.runner["imports"] == "per trial"
    assert any("thread" in note and "afresh" in note for note in result.notes)


# -- crashes and hangs that are the model's -----------------------------------------------------
@pytest.mark.parametrize(
    ("how", "exc_type"),
    [
        ("segv", "SIGSEGV"),
        ("exit", "crash"),
        ("exit0", "crash"),  # was a hang after the whole no-progress limit
        ("exit75", "crash"),  # was "peer" (torchrun's code) and so "does not fit"
        pytest.param("abort", "SIGABRT", marks=pytest.mark.slow),
    ],
)
def test_a_crash_at_one_batch_stops_the_probe_with_that_batch(how, exc_type):
    with pytest.raises(ModelCrashError) as caught:
        _misbehave(how, 16)
    err = caught.value
    assert err.batch_size == 16
    assert err.exc_type == exc_type
    assert "again under" in str(err)  # reproduced under a generous budget
    assert "not out of memory" in str(err)
    assert err.exit_code == 1


def test_a_hang_at_one_batch_is_stopped_by_the_measured_step_time_not_900_s():
    started = time.perf_counter()
    with pytest.raises(ModelCrashError) as caught:
        _misbehave("hang", 16, trial_timeout_s=5)
    assert caught.value.batch_size == 16
    assert caught.value.exc_type == "hang"
    assert "of the budget" in str(caught.value)
    assert time.perf_counter() - started < 90


def test_a_crash_at_every_batch_is_the_models_not_a_worker_start_failure():
    # the crash also hits bsfinder's rehearsal on the meta device, in the server
    with pytest.raises(ModelCrashError) as caught:
        _misbehave("segv", 0)
    assert caught.value.batch_size == 1
    assert caught.value.exc_type == "SIGSEGV"


@pytest.mark.slow
def test_a_hang_at_every_batch_is_the_models():
    with pytest.raises(ModelCrashError) as caught:
        _misbehave("hang", 0, trial_timeout_s=5)
    assert caught.value.batch_size == 1
    assert caught.value.exc_type == "hang"


def test_a_crash_that_is_memory_counts_as_out_of_memory_with_its_evidence():
    # the forward aborts where 4 MiB per sample cannot be allocated: at batch 64 under
    # 256 MiB; under a generous budget the same batch runs with a peak past the budget
    result = _misbehave("abort_if_oom", 0, max_batch=None, granularity="pow2")
    assert result.max_batch == 32
    failed = [t for t in result.trials if not t.fits]
    assert failed and all(t.failure == "oom" for t in failed)
    assert all("SIGABRT" in t.error and "counted as out of memory" in t.error for t in failed)


@pytest.mark.parametrize(
    ("how", "exc_type"), [("sysexit", "SystemExit"), ("interrupt", "KeyboardInterrupt")]
)
def test_system_exit_and_keyboard_interrupt_from_the_model_are_the_models(how, exc_type):
    with pytest.raises(UserCodeError) as caught:
        _misbehave(how, 16)
    assert not isinstance(caught.value, ModelCrashError)
    assert caught.value.exc_type == exc_type
    assert caught.value.batch_size == 16
    assert "please report" not in str(caught.value)


# -- the no-progress limit follows the measured step times --------------------------------------
def test_hang_limit_scales_with_the_slowest_step_per_sample():
    runner = ProcessRunner(
        WorkloadSpec(model="x:y"), device="cpu", memory_limit_bytes=1, warmup_steps=1, steps=1
    )
    assert runner._hang_limit_s(8) == 900.0  # nothing timed yet: --trial-timeout
    runner._timed = [(8, 0.5), (16, 2.0)]
    runner._setup_max_s = 1.0
    assert runner._hang_limit_s(16) == pytest.approx(30.0)  # 10 x 2 s + 3 x 1 s, floor 30 s
    assert runner._hang_limit_s(64) == pytest.approx(10 * 8.0 + 3.0)  # 2 s at 16 -> 8 s at 64
    given = ProcessRunner(
        WorkloadSpec(model="x:y"), device="cpu", memory_limit_bytes=1, warmup_steps=1, steps=1,
        timeout_s=60.0,
    )  # fmt: skip
    given._timed, given._setup_max_s = [(16, 2.0)], 1.0
    assert given._hang_limit_s(8) == pytest.approx(60.0)  # a given timeout is the floor too


# -- nothing outlives bsfinder; nothing in the current directory shadows its imports ------------
def test_worker_and_hung_trial_process_die_with_a_killed_bsfinder(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "bsfinder", "probe", f"{HOSTILE}/misbehave.py:Misbehave",
         "--model-kwargs", '{"how": "hang", "at": 16}', "--input", "64",
         "--memory-limit", "256MiB", "--json", "", "--trial-timeout", "600"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # until the trial at batch 16 hangs
            if "batch      4" in line:
                break
        time.sleep(2)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= 2  # the worker and the hung trial process
        os.kill(proc.pid, signal.SIGKILL)  # no handler can run: the kernel must do it
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_worker_sys_path_puts_the_stdlib_first_and_the_current_directory_last(tmp_path):
    stdlib = os.path.dirname(os.__file__)
    site = next(p for p in sys.path if p.endswith("site-packages"))
    user = str(tmp_path / "mine")
    path = worker_sys_path(["", user, site, stdlib], cwd=str(tmp_path))
    assert path.index(stdlib) < path.index(site) < path.index(user)
    assert path[-1] == os.path.realpath(tmp_path)
    assert "" not in path


def test_a_psutil_py_in_the_current_directory_is_not_imported_by_the_worker(tmp_path):
    (tmp_path / "psutil.py").write_text("raise SystemExit('the local psutil.py was imported')\n")
    (tmp_path / "mymodel.py").write_text(
        "from torch import nn\n\n\ndef Net():\n    return nn.Linear(64, 10)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "bsfinder", "probe", "mymodel:Net", "--input", "64",
         "--memory-limit", "256MiB", "--max-batch", "4", "--steps", "1", "--json", "", "--quiet"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        # the CLI itself runs from the same directory: its own sys.path must not see it
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "local psutil.py" not in done.stderr
    assert "largest that fits     : 4" in done.stdout
