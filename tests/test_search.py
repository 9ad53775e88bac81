"""The search is specified by its exact trace (what accelerate's own test does right)."""

from __future__ import annotations

import pytest

from bsfinder import FakeRunner, search
from bsfinder.core.fit import fit_memory_line


def run(dev: FakeRunner, **kwargs):
    kwargs.setdefault("capacity_bytes", dev.capacity_bytes)
    return search(lambda b: dev.run_trial(b), **kwargs)


def test_bisection_trace_without_memory_model() -> None:
    # GIVEN a device where exactly 500 samples fit
    dev = FakeRunner(capacity_bytes=500, per_sample_bytes=1)
    result = run(dev, memory_model=False, granularity=8)
    # THEN grow by 4x, then bisect on multiples of 8 between 256 and 1024
    assert result.tried == [1, 4, 16, 64, 256, 1024, 640, 448, 544, 496, 520, 504]
    assert result.max_batch == 496
    assert result.first_failure == 504
    assert result.max_pow2_batch == 256
    assert result.stop_reason == "converged"


def test_exact_granularity_one_finds_the_exact_maximum() -> None:
    dev = FakeRunner(capacity_bytes=100, per_sample_bytes=1)
    result = run(dev, memory_model=False, granularity=1)
    assert result.max_batch == 100
    assert result.first_failure == 101
    assert result.tried[:5] == [1, 4, 16, 64, 256]


def test_memory_model_jumps_to_the_answer_in_two_trials() -> None:
    # peak = 1000 + 10*b, capacity 6000 -> exactly 500 fit
    dev = FakeRunner(capacity_bytes=6000, fixed_bytes=1000, per_sample_bytes=10)
    result = run(dev, granularity=8, headroom=0.05)
    # grow by 4x until the trusted line (its segments agree, a rise of over 2% of the
    # capacity) puts the edge within 8x of the largest fit: from 64, at 500 -> 496 on the
    # grid of 8; 504 confirms it. The line's first prediction was the edge, so its safe
    # batch (peak <= 95% of 6000 = 5700 -> b <= 470 -> 464 on the grid) is not tried.
    assert result.tried == [1, 4, 16, 64, 496, 504]
    assert [s.phase for s in result.steps] == ["grow"] * 4 + ["jump", "confirm"]
    assert result.max_batch == 496
    assert result.first_failure == 504
    assert result.safe_batch == 464
    assert result.safe_from_line and result.safe_peak_estimate == 1000 + 10 * 464


def test_safe_batch_is_a_fitting_trial_within_headroom_unless_the_line_was_right() -> None:
    dev = FakeRunner(capacity_bytes=6000, fixed_bytes=1000, per_sample_bytes=10)
    assert run(dev, granularity=8, headroom=0.05).safe_from_line
    # GIVEN a line that is wrong at the edge (memory 4x steeper past 300): its safe batch is
    # tried, and it is a fitting trial within the headroom
    bent = FakeRunner(
        capacity_bytes=6000, memory=lambda b: 1000 + 10 * b + (30 * (b - 300) if b > 300 else 0)
    )
    result = run(bent, granularity=8, headroom=0.05)
    assert not result.safe_from_line and result.safe_peak_estimate is None
    assert result.safe_batch in {s.batch_size for s in result.steps if s.fits}
    assert bent.memory(result.safe_batch) <= 0.95 * 6000


def test_memory_model_falls_back_to_bisection_when_memory_is_not_linear() -> None:
    # GIVEN memory that is quadratic in batch, so the line keeps overshooting
    dev = FakeRunner(capacity_bytes=10**6, memory=lambda b: 100 * b + b * b)
    result = run(dev, granularity=1)
    true_max = max(b for b in range(1, 2000) if 100 * b + b * b <= 10**6)
    assert result.max_batch == true_max
    assert result.first_failure == true_max + 1
    # grow 1..1024 (11), two predict+confirm rounds (4), bisection of what is left (<= 9), safe
    assert len(result.tried) <= 11 + 4 + 9 + 1


def test_a_line_that_contradicts_a_failure_is_not_followed_one_granule_at_a_time() -> None:
    # GIVEN the measured MLP's shape: a flat optimizer-step peak (448) up to batch 2048,
    # then activations (240 + 0.0665 b) take over; capacity 768 -> 7939 fits, 7940 does not
    def memory(b: int) -> int:
        return round(max(448.0, 240 + 0.0665 * b) * 1000)

    dev = FakeRunner(capacity_bytes=768_000, memory=memory)
    result = run(dev, granularity=1)
    true_max = max(b for b in range(1, 9000) if memory(b) <= 768_000)
    assert (result.max_batch, result.first_failure) == (true_max, true_max + 1)
    # the line through 1024, 2048, 4096 predicts past the failure at 8192: it was 8191 x,
    # 8190 x, 8189 x, 8188 x before bisection took over (measured: 32 trials on the MLP)
    assert not {8191, 8190, 8189, 8188} & set(result.tried)
    assert len(result.tried) <= 13 + 12 + 1


def test_pow2_granularity_stops_after_the_powers_of_two() -> None:
    dev = FakeRunner(capacity_bytes=500, per_sample_bytes=1)
    result = run(dev, granularity="pow2", memory_model=False)
    assert result.tried == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert result.max_batch == 256


def test_max_batch_caps_the_search() -> None:
    dev = FakeRunner(capacity_bytes=10**9, per_sample_bytes=1)
    result = run(dev, max_batch=48, memory_model=False)
    assert result.tried == [1, 4, 16, 48]
    assert result.max_batch == 48
    assert result.first_failure is None
    assert result.stop_reason == "max-batch"


def test_start_that_fails_shrinks_by_halving() -> None:
    dev = FakeRunner(capacity_bytes=20, per_sample_bytes=1)
    result = run(dev, start=64, memory_model=False, granularity=1)
    assert result.tried[:3] == [64, 32, 16]
    assert result.max_batch == 20


def test_nothing_fits() -> None:
    dev = FakeRunner(capacity_bytes=10, fixed_bytes=100)
    result = run(dev)
    assert result.tried == [1]
    assert result.max_batch is None
    assert result.stop_reason == "nothing-fits"


def test_small_maximum_below_granularity_keeps_the_power_of_two() -> None:
    dev = FakeRunner(capacity_bytes=6, per_sample_bytes=1)
    result = run(dev, granularity=8, memory_model=False)
    assert result.tried == [1, 4, 16, 8]  # 4x overshoots: one trial on the grid between
    assert result.max_batch == 4


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([(1, 110), (2, 120), (4, 140)], (100.0, 10.0)),
        ([(8, 5)], None),
        ([(1, 10), (2, 10)], None),  # flat: no positive slope
    ],
)
def test_fit_memory_line(points, expected) -> None:
    fitted = fit_memory_line(points)
    if expected is None:
        assert fitted is None
    else:
        assert fitted == pytest.approx(expected)


@pytest.mark.parametrize(
    "bad", [{"start": 0}, {"max_batch": 0}, {"granularity": 0}, {"headroom": 1.0}]
)
def test_invalid_arguments_are_rejected(bad) -> None:
    dev = FakeRunner(capacity_bytes=10)
    with pytest.raises(ValueError):
        run(dev, **bad)


def test_pow2_granularity_keeps_bounds_on_powers_of_two() -> None:
    dev = FakeRunner(capacity_bytes=10**6, per_sample_bytes=1)
    assert run(dev, granularity="pow2", start=3, max_batch=50).tried == [2, 4, 8, 16, 32]
