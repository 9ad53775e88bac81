"""The probe over a fake device: recommendations, user errors, interruption."""

from __future__ import annotations

import pytest

import bsfinder
from bsfinder import FakeRunner, ProbeSettings, UserCodeError, run_probe
from bsfinder.core.results import Trial


def saturating(b: int) -> float:
    """Step time of a device that saturates at batch ~64: 20 ms + 1 ms per 64 samples."""
    return 0.020 + b / 64 * 0.001 + max(0, b - 64) * 0.0003


def test_recommendations_fit_and_say_which_were_not_run() -> None:
    dev = FakeRunner(
        capacity_bytes=6000,
        fixed_bytes=1000,
        per_sample_bytes=10,
        step_time=lambda b: 0.01 + 0.001 * b,
    )
    result = run_probe(dev, ProbeSettings(base_lr=0.1, base_batch=32, optimizer="sgd"))
    rec = result.recommendations
    fitting = {t.batch_size for t in result.trials if t.fits}
    # the largest and the time-optimal batch are fitting trials
    assert {rec.max_batch, rec.time_optimal_batch} <= fitting
    assert rec.max_batch == 496 and rec.first_failure == 504
    # the largest power of two and the safe batch lie below the largest fit (so they fit);
    # neither was run on its own, and the result says so
    assert rec.max_pow2_batch == 256 and 256 not in fitting
    assert rec.safe_batch == 464 and 464 not in fitting
    assert result.search["safe_peak_estimate"] == 1000 + 10 * 464
    assert rec.learning_rate is not None
    assert rec.learning_rate.batch_size == rec.time_optimal_batch
    assert [t.phase for t in result.trials] == ["grow"] * 4 + ["jump", "confirm"]


def test_time_optimal_is_the_knee_not_the_largest() -> None:
    dev = FakeRunner(capacity_bytes=10**6, per_sample_bytes=1000, step_time=saturating)
    result = run_probe(dev, ProbeSettings())
    rates = {t.batch_size: t.samples_per_s for t in result.trials if t.fits and t.timed}
    best = max(rates.values())
    optimal = result.time_optimal_batch
    assert rates[optimal] >= 0.95 * best
    assert all(rates[b] < 0.95 * best for b in rates if b < optimal)
    assert optimal < result.max_batch


def test_user_error_propagates_and_is_not_nothing_fits() -> None:
    dev = FakeRunner(capacity_bytes=10**6, raise_at=16)
    with pytest.raises(UserCodeError, match="at batch 16"):
        run_probe(dev, ProbeSettings())


class _Interrupting(FakeRunner):
    def run_trial(self, batch_size, on_step=None, *, timed=True) -> Trial:
        if batch_size == 64:
            raise KeyboardInterrupt
        return super().run_trial(batch_size, on_step, timed=timed)


def test_interrupt_keeps_what_was_measured() -> None:
    dev = _Interrupting(capacity_bytes=10**6)
    result = run_probe(dev, ProbeSettings())
    assert result.interrupted
    assert [t.batch_size for t in result.trials] == [1, 4, 16]
    assert result.max_batch == 16


def test_events_report_each_trial_and_step() -> None:
    events = []
    dev = FakeRunner(capacity_bytes=100, per_sample_bytes=10, steps=2)
    run_probe(dev, ProbeSettings(granularity="pow2"), on_event=events.append)
    kinds = [e.kind for e in events]
    assert kinds[0] == "started"
    assert kinds[1:5] == ["trial", "step", "step", "trial-done"]


def test_public_surface_is_sorted_and_importable() -> None:
    assert bsfinder.__all__ == sorted(bsfinder.__all__)
    for name in bsfinder.__all__:
        assert hasattr(bsfinder, name), name
