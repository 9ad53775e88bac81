"""The fork server builds the model once; every trial process inherits it, and its budget
still counts the weights as the trial's own.

Real trial processes and small models throughout. Before: every trial process ran the
model's initialisation again (15 ``Linear(8192, 8192)``, 1.0 B parameters, 2 cores: 4.5 s of
set-up per trial against a 3.2 s step; after: 1.7 s, benchmarks/setup_cost.py).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bsfinder.errors import ModelCrashError, UserCodeError
from bsfinder.execution.process import ProcessRunner
from bsfinder.workload.loading import parse_input_spec
from bsfinder.workload.step import WorkloadSpec

#: factories that leave a trace of each call (one line: the process, the device it built on)
FACTORIES = """
import os
import signal
import threading
import time

import torch
from torch import nn


def _record(log):
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"{os.getpid()} {torch.empty(0).device.type}\\n")


def counted(log):
    _record(log)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def raises(log):
    _record(log)
    raise ValueError("no layer of width 0")


def crashes(log):
    _record(log)
    if torch.empty(0).device.type == "cpu":  # not in the rehearsal (meta): the real build
        os.kill(os.getpid(), signal.SIGSEGV)
    return nn.Linear(16, 4)


def starts_a_thread(log):
    _record(log)
    if torch.empty(0).device.type == "cpu":  # not in the rehearsal (meta): the real build
        threading.Thread(target=time.sleep, args=(120,), daemon=True).start()
    return nn.Linear(16, 4)
"""


@pytest.fixture
def factories(tmp_path: Path) -> Path:
    path = tmp_path / "factories.py"
    path.write_text(textwrap.dedent(FACTORIES), encoding="utf-8")
    return path


def _runner(spec: WorkloadSpec, budget: int, *, prebuild: bool = True) -> ProcessRunner:
    runner = ProcessRunner(spec, device="cpu", memory_limit_bytes=budget, warmup_steps=1, steps=1)
    runner.prebuild = prebuild
    return runner


def _factory_spec(factories: Path, name: str, log: Path) -> WorkloadSpec:
    return WorkloadSpec(
        model=f"{factories}:{name}",
        model_kwargs={"log": str(log)},
        inputs=(parse_input_spec("16"),),
    )


def _cpu_builds(log: Path) -> list[str]:
    """The pids of the factory's calls that built a real model (the rehearsal's: meta)."""
    lines = log.read_text(encoding="utf-8").split("\n") if log.exists() else []
    return [line.split()[0] for line in lines if line.endswith(" cpu")]


@pytest.mark.parametrize("prebuild", [True, False])
def test_the_model_factory_runs_once_per_server_not_once_per_trial(factories, tmp_path, prebuild):
    log = tmp_path / "calls.log"
    runner = _runner(_factory_spec(factories, "counted", log), 64 * 2**20, prebuild=prebuild)
    try:
        runner.start()
        trials = [runner.run_trial(batch) for batch in (2, 4, 8)]
        stats = runner.stats()
        server_pid = runner._proc.pid if runner._proc else None
    finally:
        runner.close()
    assert all(t.fits for t in trials)
    builds = _cpu_builds(log)
    if prebuild:
        # GIVEN a describe and three trials WHEN the server builds THEN one build, the server's
        assert stats["server_starts"] == 1 and stats["model_builds"] == "once"
        assert builds == [str(server_pid)]
    else:  # the internal switch off: one build in each trial process, as before
        assert stats["model_builds"] == "per trial"
        assert len(builds) == stats["trial_processes"] == 4
        assert str(server_pid) not in builds


def _largest_and_peaks(prebuild: bool) -> tuple[int, dict[int, int]]:
    """Largest batch that fits SmallCNN (width 64: 4.6 MB of weights, ~1.9 MB a sample) in
    96 MiB, found by doubling then bisecting, and the peak of every batch tried."""
    spec = WorkloadSpec(
        model="bsfinder.examples:SmallCNN",
        model_kwargs={"width": 64},
        inputs=(parse_input_spec("3x32x32"),),
        optimizer="sgd",
    )
    runner = _runner(spec, 96 * 2**20, prebuild=prebuild)
    peaks: dict[int, int] = {}
    try:
        runner.start()
        assert runner.stats()["model_builds"] == ("once" if prebuild else "per trial")

        def fits(batch: int) -> bool:
            trial = runner.run_trial(batch)
            if trial.fits:
                assert trial.peak_bytes is not None
                peaks[batch] = trial.peak_bytes
            return trial.fits

        lo, hi = 0, 4
        while fits(hi):
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    finally:
        runner.close()
    return lo, peaks


def test_the_budget_counts_inherited_weights_as_the_trials_own():
    # Measured (SmallCNN width 32, 3x32x32, 256 MiB): the same batch's peak varied by 150 KiB
    # from process to process, building in each trial. The weights here are 4.6 MB: not
    # counting them would let ~2 more samples fit and lower every peak by 4.6 MB.
    largest_built_here, peaks_built_here = _largest_and_peaks(prebuild=False)
    largest_inherited, peaks_inherited = _largest_and_peaks(prebuild=True)
    assert largest_inherited == largest_built_here
    both = sorted(set(peaks_built_here) & set(peaks_inherited))
    assert len(both) >= 3
    for batch in both:
        assert abs(peaks_inherited[batch] - peaks_built_here[batch]) < 2**20, batch


@pytest.mark.parametrize("prebuild", [True, False])
def test_a_factory_that_raises_is_reported_as_the_models_error(factories, tmp_path, prebuild):
    runner = _runner(_factory_spec(factories, "raises", tmp_path / "calls.log"), 64 * 2**20)
    runner.prebuild = prebuild
    try:
        with pytest.raises(UserCodeError, match="no layer of width 0") as caught:
            runner.start()
    finally:
        runner.close()
    assert caught.value.exc_type == "ValueError"
    assert caught.value.batch_size is None


@pytest.mark.parametrize("prebuild", [True, False])
def test_a_build_that_crashes_is_reported_as_the_models_crash(factories, tmp_path, prebuild):
    # the server dies while building: it starts again without building, and the trial
    # process's crash is judged as it always was
    runner = _runner(_factory_spec(factories, "crashes", tmp_path / "calls.log"), 64 * 2**20)
    runner.prebuild = prebuild
    try:
        with pytest.raises(ModelCrashError, match="SIGSEGV") as caught:
            runner.start()
    finally:
        runner.close()
    assert "building the model" in str(caught.value)
    assert any("building the model once" in n for n in runner.notes) == prebuild


@pytest.mark.parametrize("prebuild", [True, False])
def test_a_model_larger_than_the_budget_itself_does_not_fit(prebuild):
    spec = WorkloadSpec(
        model="tests.models:mlp",
        model_kwargs={"width": 4096, "hidden": 8192},  # 352 MB of weights
        inputs=(parse_input_spec("4096"),),
    )
    runner = _runner(spec, 64 * 2**20, prebuild=prebuild)
    try:
        info = runner.start()
        trial = runner.run_trial(1)
        stats = runner.stats()
    finally:
        runner.close()
    assert info.build_failure is not None and "DefaultCPUAllocator" in info.build_failure
    assert not trial.fits and trial.failure == "oom"
    assert "building the model ran out of memory" in (trial.error or "")
    assert stats["model_builds"] == "per trial"  # the server's build did not fit either


def test_a_build_that_starts_a_thread_is_done_in_each_trial_process(factories, tmp_path):
    log = tmp_path / "calls.log"
    runner = _runner(_factory_spec(factories, "starts_a_thread", log), 64 * 2**20)
    try:
        runner.start()
        trial = runner.run_trial(4)
        stats = runner.stats()
    finally:
        runner.close()
    assert trial.fits
    assert stats["imports"] == "once" and stats["model_builds"] == "per trial"
    assert any("building the model started 1 thread" in n for n in runner.notes)
    assert len(_cpu_builds(log)) == 1 + stats["trial_processes"]  # the poisoned server's too


def test_no_server_build_when_its_copy_and_a_full_budget_would_not_fit_in_ram(factories, tmp_path):
    # a trial writes its weights and holds a copy of its own: the server's copy plus a trial
    # that uses its whole budget must fit in the memory available, or the machine swaps
    import psutil

    log = tmp_path / "calls.log"
    total = psutil.virtual_memory().total  # more than is ever available
    runner = _runner(_factory_spec(factories, "counted", log), total)
    try:
        runner.start()
        trial = runner.run_trial(4)
        stats = runner.stats()
    finally:
        runner.close()
    assert trial.fits
    assert stats["model_builds"] == "per trial"
