"""The fake device backend under the real trial and the real search: no torch memory, exact
numbers. The step allocates from the backend (weights once, then ``fixed + per_sample * b``
per step), so every peak and every limit is known in advance."""

from __future__ import annotations

import pytest

from bsfinder.core.results import Trial
from bsfinder.core.search import search
from bsfinder.devices.base import DeviceBackend
from bsfinder.devices.fake import FakeBackend
from bsfinder.execution.trial import execute_trial
from bsfinder.workload.step import Workload, WorkloadSpec

WEIGHTS, FIXED, PER_SAMPLE = 1_000, 500, 100


def _workload(backend: FakeBackend) -> Workload:
    def train_step(batch_size: int) -> None:
        activations = FIXED + PER_SAMPLE * batch_size
        backend.allocate(activations)
        backend.free(activations)

    workload = Workload(WorkloadSpec(), "cpu", train_step=train_step)
    workload.load()
    workload.build()
    backend.allocate(WEIGHTS)  # lives across trials, as a model's weights do
    return workload


def _trial(workload: Workload, backend: FakeBackend, batch: int) -> Trial:
    return execute_trial(workload, backend, batch, warmup_steps=1, steps=2)


def test_it_is_a_device_backend() -> None:
    backend = FakeBackend(capacity_bytes=100)
    assert isinstance(backend, DeviceBackend)
    assert backend.describe() == {"kind": "fake", "name": "fake", "total_bytes": 100}


def test_the_search_over_real_trials_finds_the_exact_limit() -> None:
    backend = FakeBackend(capacity_bytes=20_000)
    capacity = backend.apply_budget(10_000)
    workload = _workload(backend)
    result = search(lambda b: _trial(workload, backend, b), capacity_bytes=capacity, granularity=1)
    largest = (capacity - WEIGHTS - FIXED) // PER_SAMPLE
    assert (result.max_batch, result.first_failure) == (largest, largest + 1)
    assert backend.allocated_bytes == WEIGHTS  # nothing a failed step allocated is left


def test_a_trial_reads_its_own_peak_and_an_overflow_is_out_of_memory() -> None:
    backend = FakeBackend(capacity_bytes=10_000)
    backend.apply_budget(None)
    workload = _workload(backend)
    big = _trial(workload, backend, 80)
    small = _trial(workload, backend, 10)  # after the larger one: the peak was reset
    assert big.fits and big.steps_run == 3 and len(big.step_times_s) == 2
    assert big.peak_bytes == WEIGHTS + FIXED + PER_SAMPLE * 80
    assert small.peak_bytes == WEIGHTS + FIXED + PER_SAMPLE * 10
    over = _trial(workload, backend, 86)
    assert not over.fits and over.failure == "oom" and over.steps_run == 0
    assert over.error.startswith("python: fake device: cannot allocate")


@pytest.mark.parametrize("enforce", [True, False])
def test_a_budget_limits_allocations_only_when_enforced(enforce: bool) -> None:
    backend = FakeBackend(capacity_bytes=10_000)
    assert backend.apply_budget(5_000, enforce=enforce) == 5_000
    assert backend.under_limit is enforce
    workload = _workload(backend)
    assert _trial(workload, backend, 60).fits is not enforce  # peak 7,500: over the budget
    backend.release_budget()
    assert not backend.under_limit and _trial(workload, backend, 60).fits


def test_the_capacity_is_settable() -> None:
    backend = FakeBackend(capacity_bytes=10_000)
    workload = _workload(backend)
    assert _trial(workload, backend, 60).fits
    backend.capacity_bytes = 5_000  # a smaller device
    assert not _trial(workload, backend, 60).fits
    with pytest.raises(ValueError, match="cannot free"):
        backend.free(WEIGHTS + 1)
