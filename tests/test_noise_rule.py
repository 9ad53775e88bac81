"""The time-optimal rule under noise: a fitted throughput model, and a flag when reruns would
disagree (issue 14: one CNN gave 64 and 527 on two runs of a busy machine)."""

from __future__ import annotations

import math
import random

import pytest

from bsfinder.core.recommend import time_optimal, time_optimal_batch
from bsfinder.core.results import Trial

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def linear(b: float) -> float:
    """20 ms fixed + 1 ms per sample: the knee (95% of 512's samples/s) is 256."""
    return 0.020 + 0.001 * b


def saturating(b: float) -> float:
    """Flat until 64, then 0.3 ms per sample (a device that saturates): the knee is 64."""
    return 0.020 + b / 64 * 0.001 + max(0, b - 64) * 0.0003


def draw(curve, sigma: float, seed: int, steps: int = 3) -> list[Trial]:
    """One probe's timed trials: every step time x a log-normal factor, and each trial x one
    more (the load changing between trials)."""
    rng = random.Random(seed)
    trials = []
    for b in BATCHES:
        load = math.exp(rng.gauss(0, sigma))
        times = tuple(curve(b) * load * math.exp(rng.gauss(0, sigma)) for _ in range(steps))
        trials.append(Trial(b, True, times))
    return trials


@pytest.mark.parametrize(("curve", "knee"), [(linear, 256), (saturating, 64)])
def test_a_clean_curve_gives_the_exact_knee_and_is_not_noisy(curve, knee) -> None:
    found = time_optimal(draw(curve, 0.0, 0))
    assert (found.batch, found.noisy, found.agreement) == (knee, False, 1.0)
    assert found.step_time_spread == 0.0


@pytest.mark.parametrize(
    ("curve", "knee", "sigma"),
    [(linear, 256, 0.1), (linear, 256, 0.2), (linear, 256, 0.3),
     (saturating, 64, 0.1), (saturating, 64, 0.2)],
)  # fmt: skip
def test_five_noisy_reruns_give_the_knee_or_a_noisy_flag(curve, knee, sigma) -> None:
    # GIVEN five probes of one curve with 10-30% step-time noise
    for seed in range(5):
        found = time_optimal(draw(curve, sigma, seed))
        # THEN each gives the clean knee, or says it is noisy, with the range reruns may give
        if found.noisy:
            assert found.low <= found.batch <= found.high and found.agreement < 0.8
        else:
            assert found.batch == knee, (seed, found)


def test_the_verdict_is_reproducible() -> None:
    trials = draw(linear, 0.3, 7)
    assert time_optimal(trials) == time_optimal(trials)


def test_noisy_steps_raise_the_spread() -> None:
    found = time_optimal(draw(linear, 0.2, 3))
    assert found.step_time_spread is not None and 0.2 < found.step_time_spread < 1.0
    assert Trial(8, True, (0.1, 0.12, 0.09)).step_time_spread == pytest.approx(0.3)
    assert Trial(8, True, (0.1,)).step_time_spread is None


def test_one_timed_trial_is_the_answer() -> None:
    found = time_optimal([Trial(8, True, (0.1, 0.1)), Trial(16, False)])
    assert (found.batch, found.noisy, found.model) == (8, False, None)


def test_no_timed_trial_gives_no_answer_and_does_not_crash() -> None:
    untimed = [Trial(8, True, ()), Trial(16, True, ()), Trial(32, False)]
    found = time_optimal(untimed)
    assert found.batch is None and found.step_time_spread is None
    assert all(t.samples_per_s is None and not t.timed for t in untimed)


def test_untimed_fitting_batches_are_candidates_within_twice_the_timed_range() -> None:
    # GIVEN t(b) = b ms (flat throughput) timed up to 64, untimed fits at 16, 100 and 400
    timed = [Trial(b, True, (0.001 * b,)) for b in (32, 64)]
    untimed = [Trial(b, True, ()) for b in (16, 100, 400)]
    # THEN 16 (below the timed range) and 400 (beyond 2x 64) are not extrapolated to
    assert time_optimal([*timed, *untimed]).batch == 32
    # AND with a fixed cost the knee can be an untimed batch inside 2x the timed range
    rising = [Trial(b, True, (0.1 + 0.001 * b,)) for b in (8, 16, 32, 64)]
    assert time_optimal_batch([*rising, Trial(128, True, ())]) == 128


def test_flat_and_decreasing_throughput_give_the_smallest_batch() -> None:
    flat = [Trial(b, True, (0.001 * b,)) for b in BATCHES]
    assert time_optimal_batch(flat) == 1
    falling = [Trial(b, True, (0.001 * b + 1e-6 * b * b,)) for b in BATCHES]
    assert time_optimal_batch(falling) == 1


# -- compare takes the measured noise into account ------------------------------------------
def test_compare_calls_a_noisy_pair_within_noise_and_a_clean_regression_a_regression() -> None:
    from pathlib import Path

    from bsfinder.core.compare import compare, parse_threshold
    from bsfinder.core.results import ProbeResult
    from bsfinder.report.compare import render_comparison

    fixtures = Path(__file__).parent / "fixtures"
    gate = (parse_threshold("samples-per-s:-10%"),)
    # GIVEN two real SmallCNN probes on a busy 2-core machine (the second with a busy loop
    # beside it), steps varying 44% and 37% within trials, samples/s at 544 down 43%
    quiet = ProbeResult.load(fixtures / "compare-noisy-quiet.json")
    loaded = ProbeResult.load(fixtures / "compare-noisy-loaded.json")
    noisy = compare(quiet, loaded, gate)
    speed = next(d for d in noisy.deltas if d.metric == "samples-per-s")
    assert speed.change == pytest.approx(-0.428, abs=1e-3) and speed.noise > 0.5
    # THEN it is within noise, not a regression, and says so with the numbers
    assert noisy.ok and speed.within_noise == ("samples-per-s:-10%",)
    assert "within noise (samples-per-s:-10%; noise 58%)" in render_comparison(noisy)
    # AND a clean 13% slowdown (steps identical within trials) still fails the gate
    base = ProbeResult.load(fixtures / "compare-base.json")
    regressed = ProbeResult.load(fixtures / "compare-regressed.json")
    clean = compare(base, regressed, gate)
    assert not clean.ok and next(d for d in clean.deltas if d.metric == "samples-per-s").failed
