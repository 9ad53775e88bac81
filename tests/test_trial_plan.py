"""The trial plan: which trials are timed, where the search jumps, when it stops for time,
and what caps it. Traces are pinned exactly (FakeRunner: pure logic), and the steps an
untimed trial needs to reach its peak are measured on real trials."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest

from bsfinder import FakeRunner, ProbeSettings, run_probe, search
from bsfinder.core.search import plateaued, trial_cost_s
from bsfinder.report import render_summary


def flat(b: int) -> float:
    """A device saturated from batch 4: 1 ms per sample, at least 4 ms."""
    return 0.001 * max(b, 4)


def plan(dev: FakeRunner, **kwargs):
    kwargs.setdefault("capacity_bytes", dev.capacity_bytes)
    return search(
        lambda b: dev.run_trial(b),
        check_fit=lambda b: dev.run_trial(b, timed=False),
        **kwargs,
    )


def test_flat_throughput_stops_timing_and_the_trusted_line_jumps_near_the_edge() -> None:
    # GIVEN peak = 1000 + 10 b within 100,000 (exactly 9,900 fit) and throughput flat from 4
    dev = FakeRunner(capacity_bytes=100_000, fixed_bytes=1000, per_sample_bytes=10, step_time=flat)
    result = plan(dev, granularity=1, headroom=0.05)
    trace = [(s.batch_size, s.phase, s.fits, s.timed) for s in result.steps]
    # THEN 1, 4, 16 are timed (16 is a flat 4x step), 64..4096 only checked (grown by 4x
    # until the line puts the edge within 8x of the largest fit: from 4096), then one jump
    # to the edge the line puts at 9,900 and its confirmation; the line's first prediction
    # was the edge, so its safe batch ((95,000 - 1000) / 10 = 9,400) is not run on its own
    assert trace == [
        (1, "grow", True, True),
        (4, "grow", True, True),
        (16, "grow", True, True),
        (64, "grow", True, False),
        (256, "grow", True, False),
        (1024, "grow", True, False),
        (4096, "grow", True, False),
        (9900, "jump", True, False),
        (9901, "confirm", False, False),
    ]
    assert (result.max_batch, result.first_failure, result.safe_batch) == (9900, 9901, 9400)
    assert result.safe_from_line and result.safe_peak_estimate == 95_000
    # the largest power of two under the largest fit, which the jump passed over
    assert result.max_pow2_batch == 8192


def test_a_line_that_bends_is_not_jumped_along() -> None:
    # GIVEN a flat optimizer-state peak until 2048, then activations (the MLP's shape)
    def memory(b: int) -> int:
        return round(max(448.0, 240 + 0.0665 * b) * 1000)

    dev = FakeRunner(capacity_bytes=768_000, memory=memory, step_time=flat)
    result = plan(dev, granularity=1)
    # THEN it keeps doubling through the bend, and still ends exact
    assert "jump" not in [s.phase for s in result.steps][:13]
    true_max = max(b for b in range(1, 9000) if memory(b) <= 768_000)
    assert (result.max_batch, result.first_failure) == (true_max, true_max + 1)


def test_a_jump_that_fails_is_bisected_and_still_exact() -> None:
    # GIVEN memory linear to 1000, then four times steeper: the line overshoots
    def memory(b: int) -> int:
        return 1000 + 10 * b + (30 * (b - 1000) if b > 1000 else 0)

    dev = FakeRunner(capacity_bytes=60_000, memory=memory, step_time=flat)
    result = plan(dev, granularity=1)
    true_max = max(b for b in range(1, 6000) if memory(b) <= 60_000)
    assert [s.phase for s in result.steps if s.phase == "jump"] == ["jump"]
    assert not result.steps[[s.phase for s in result.steps].index("jump")].fits
    assert (result.max_batch, result.first_failure) == (true_max, true_max + 1)


def test_a_rising_throughput_keeps_every_growth_trial_timed() -> None:
    dev = FakeRunner(capacity_bytes=6000, fixed_bytes=1000, per_sample_bytes=10)
    result = plan(dev, granularity=8)
    # 1..64 grow by 4x, timed (throughput rises); the line through 4, 16, 64 puts the edge
    # (500) within 8x of 64: the jump and its confirmation are fit-only trials
    assert [s.batch_size for s in result.steps if s.timed] == [1, 4, 16, 64]
    assert [(s.batch_size, s.phase) for s in result.steps if not s.timed] == [
        (496, "jump"),
        (504, "confirm"),
    ]


def test_plateau_needs_a_flat_4x_range() -> None:
    def trials(*batches: int) -> list:
        return [FakeRunner(capacity_bytes=10**9, step_time=flat).run_trial(b) for b in batches]

    assert not plateaued(trials(1, 2, 4))  # 4 is still 2x the samples/s of 2
    assert not plateaued(trials(1, 2, 4, 8))  # one flat doubling: a 2x range
    assert plateaued(trials(1, 2, 4, 8, 16))  # two flat doublings
    assert plateaued(trials(1, 4, 16))  # one flat step of 4x
    assert not plateaued(trials(4, 16))  # two timed trials are not enough


def test_trial_cost_scales_the_largest_fitting_trial() -> None:
    dev = FakeRunner(capacity_bytes=10**9, step_time=lambda b: 0.01 * b, setup_s=0.5)
    done = [dev.run_trial(b) for b in (1, 2, 4)]  # 3 steps each: walls 0.53, 0.56, 0.62
    # setup: the fastest trial (0.53 s); a step at 4: (0.62 - 0.53) / 3 = 0.03 s, x10 at 40
    assert trial_cost_s(done, 40, 2) == pytest.approx(0.53 + 2 * 0.3)
    assert trial_cost_s([], 40, 2) is None


def slow(b: int) -> float:
    """A CPU: 5 ms per sample, no saturation (samples/s flat from the start)."""
    return 0.005 * b + 0.001


def test_time_limit_stops_with_an_honest_partial_answer() -> None:
    # GIVEN over 200 s of trials to reach the edge (9,900) and a limit of 40 s: doubling to
    # 512 takes 12.3 s (simulated), the jump to 9,400 would take ~94 s
    dev = FakeRunner(
        capacity_bytes=100_000, fixed_bytes=1000, per_sample_bytes=10, step_time=slow, setup_s=0.2
    )
    result = run_probe(dev, ProbeSettings(granularity=1, time_limit_s=40.0))
    spent = sum(t.wall_s for t in result.trials)
    # THEN no trial ends after the limit, the last one is the largest the time left allowed
    assert spent <= 40.0
    assert result.search["stop_reason"] == "time-limit"
    assert result.partial and result.to_dict()["partial"] is True
    assert result.trials[-1].phase == "affordable" and result.trials[-1].fits
    assert result.max_batch == result.trials[-1].batch_size > 1.25 * 512
    # the edge the line puts (not tried) and what the trial not started would have cost
    assert result.search["edge_estimate"] == 9900
    assert result.search["next_batch"] > result.max_batch
    assert result.search["next_trial_s"] > 40.0 - spent
    line = next(x for x in render_summary(result).splitlines() if x.startswith("time limit"))
    assert f"fits up to {result.max_batch}" in line
    assert "the memory line puts the edge near 9900, not tried" in line
    assert f"one trial at {result.search['next_batch']} would take ~" in line
    assert json.loads(result.to_json())["search"]["edge_estimate"] == 9900


def test_without_a_time_limit_the_same_search_ends_exact() -> None:
    dev = FakeRunner(
        capacity_bytes=100_000, fixed_bytes=1000, per_sample_bytes=10, step_time=slow, setup_s=0.2
    )
    result = run_probe(dev, ProbeSettings(granularity=1, time_limit_s=None))
    assert (result.max_batch, result.recommendations.first_failure) == (9900, 9901)
    assert not result.partial and result.search["stop_reason"] == "converged"


def test_dataset_size_caps_the_search_unless_max_batch_is_given() -> None:
    dev = FakeRunner(capacity_bytes=10**9, per_sample_bytes=1, step_time=flat)
    capped = run_probe(dev, ProbeSettings(dataset_size=1400))
    assert max(t.batch_size for t in capped.trials) == 1400
    assert capped.max_batch == 1400 and capped.search["capped_by"] == "dataset-size"
    assert "the data set's size" in render_summary(capped)
    # per rank under several ranks
    ranks = run_probe(dev, ProbeSettings(dataset_size=1400, world_size=2))
    assert max(t.batch_size for t in ranks.trials) == 700
    # asked for: --max-batch goes past the data set
    asked = run_probe(dev, ProbeSettings(dataset_size=1400, max_batch=4096))
    assert asked.max_batch == 4096 and asked.search["capped_by"] == "max-batch"


_COMBINATIONS = list(itertools.product(("adamw", "sgd", "none"), ("32", "bf16-mixed")))


@pytest.mark.parametrize(
    ("optimizer", "precision"),
    [
        pytest.param(*c, marks=() if c == ("adamw", "32") else pytest.mark.slow)
        for c in _COMBINATIONS
    ],
)
def test_steps_to_peak_reach_the_steady_state_peak(optimizer: str, precision: str) -> None:
    """An untimed trial (STEPS_TO_PEAK steps) meets the peak of a trial of 5 steps, and one
    step does not (the optimizer state and the gradients exist from step 2 on): real trials,
    each in a fresh process, through the process runner's untimed plan. AdamW fp32 in the
    fast tier (9 s on 2 cores), the other optimizers and bf16 with -m slow."""
    from bsfinder.execution.process import ProcessRunner
    from bsfinder.workload.loading import parse_input_spec
    from bsfinder.workload.step import STEPS_TO_PEAK, WorkloadSpec

    spec = WorkloadSpec(
        model="bsfinder.examples:SmallCNN",
        inputs=(parse_input_spec("3x32x32"),),
        optimizer=optimizer,
        precision=precision,
    )

    def peaks(warmup: int, *timed: bool) -> list[int]:
        runner = ProcessRunner(
            spec, device="cpu", memory_limit_bytes=2**30, warmup_steps=warmup, steps=1
        )
        try:
            runner.start()
            trials = [runner.run_trial(64, timed=t) for t in timed]
        finally:
            runner.close()
        assert all(t.fits and t.peak_bytes for t in trials)
        return [t.peak_bytes for t in trials]

    enough, five = peaks(4, False, True)  # untimed: STEPS_TO_PEAK steps; timed: 4 + 1
    (one,) = peaks(0, True)
    assert STEPS_TO_PEAK == 2
    assert enough >= five - 2**20  # within 1 MiB (measured: 0.2 MiB at most)
    assert one < enough - 4 * 2**20  # measured: 8-11 MiB less at batch 64


def test_fit_only_trials_run_the_steps_to_the_peak_and_time_the_last_once() -> None:
    dev = FakeRunner(capacity_bytes=10**6)
    timed, untimed = dev.run_trial(8), dev.run_trial(8, timed=False)
    assert timed.timed and timed.steps_run == 3 and len(timed.step_times_s) == 3
    assert untimed.steps_run == 2 and len(untimed.step_times_s) == 1  # one reading
    assert untimed.step_time_spread is None  # one reading says nothing of the spread
    assert not replace(untimed, step_times_s=()).timed


@pytest.mark.parametrize(
    ("warmup", "steps", "timed", "user_step", "recipe"),
    [
        (1, 3, True, False, (1, 3)),  # a timed trial: the recipe as given
        (1, 3, False, False, (1, 1)),  # fit-only: 2 steps to the peak, the second timed
        (0, 1, False, False, (1, 0)),  # a one-step recipe: a first step is no reading
        (1, 3, False, True, (3, 1)),  # a train_step: its whole recipe, the last timed
    ],
)
def test_trial_recipe(warmup, steps, timed, user_step, recipe) -> None:
    from bsfinder.workload.step import trial_recipe

    assert trial_recipe(warmup, steps, timed=timed, user_step=user_step) == recipe


def test_a_line_a_little_short_of_a_fit_steps_up_instead_of_bisecting() -> None:
    # GIVEN memory that bends down (less per sample at large batches), so the line through
    # the largest fits puts the edge just below a batch that still fits, and a failure far
    # above (ResNet under 512 MiB: line 672, fits 673, failure at 1024)
    def memory(b: int) -> int:
        return round(100_000 + 1000 * b - 0.1 * b * b)

    cap = 700_000
    dev = FakeRunner(capacity_bytes=cap, memory=memory, step_time=lambda b: 0.001 * b**0.5)
    result = plan(dev, granularity=1)
    true_max = max(b for b in range(1, 2000) if memory(b) <= cap)
    assert (result.max_batch, result.first_failure) == (true_max, true_max + 1)
    # the jump fits and so does the batch above it: a second jump along the refitted line,
    # then steps up; no bisection from the growth's last fit
    phases = [s.phase for s in result.steps]
    assert phases[5:] == ["jump", "confirm", "jump", "confirm", "extend", "safe"]
    assert len(result.steps) <= 5 + 6


def test_a_time_limit_before_anything_fitted_is_not_nothing_fits() -> None:
    # GIVEN a start batch that fails and a limit already spent on it
    dev = FakeRunner(capacity_bytes=100, per_sample_bytes=10, step_time=slow, setup_s=5.0)
    result = run_probe(dev, ProbeSettings(start_batch=64, time_limit_s=6.0))
    assert result.max_batch is None and result.partial
    text = render_summary(result)
    assert "nothing fitted" in text and "nothing fits" not in text
