"""Learning-rate rules give the published numbers; time-optimal is the throughput knee."""

from __future__ import annotations

import pytest

from bsfinder import Trial, scale_learning_rate, time_optimal_batch
from bsfinder.errors import SpecError


def test_goyal_linear_rule() -> None:
    # Goyal et al. 2017: 0.1 per 256 images -> 3.2 at 8192, 5 epochs of warm-up
    advice = scale_learning_rate(base_lr=0.1, base_batch=256, batch_size=8192, optimizer="sgd")
    assert advice.rule == "linear"
    assert advice.lr == pytest.approx(3.2)
    assert advice.warmup_epochs == 5


def test_sqrt_rule_for_adam_family() -> None:
    advice = scale_learning_rate(base_lr=3e-4, base_batch=64, batch_size=256, optimizer="adamw")
    assert advice.rule == "sqrt"
    assert advice.lr == pytest.approx(6e-4)
    assert advice.factor == 4


def test_warmup_in_steps_from_dataset_size() -> None:
    advice = scale_learning_rate(
        base_lr=0.1, base_batch=256, batch_size=1024, rule="linear", dataset_size=1_281_167
    )
    assert advice.warmup_steps == 6256  # ceil(5 * 1281167 / 1024)


def test_no_warmup_when_the_batch_does_not_grow() -> None:
    advice = scale_learning_rate(base_lr=0.1, base_batch=256, batch_size=128, rule="linear")
    assert advice.lr == pytest.approx(0.05)
    assert advice.warmup_epochs == 0


@pytest.mark.parametrize("bad", [{"base_lr": 0}, {"base_lr": -1}, {"rule": "cubic"}])
def test_invalid_lr_inputs(bad) -> None:
    args = {"base_lr": 0.1, "base_batch": 256, "batch_size": 512, **bad}
    with pytest.raises(SpecError):
        scale_learning_rate(**args)


def _trial(batch: int, samples_per_s: float, fits: bool = True) -> Trial:
    return Trial(batch, fits, (batch / samples_per_s,), steps_run=2)


def test_time_optimal_is_smallest_batch_within_tolerance_of_best() -> None:
    # GIVEN step time 20 ms + 1 ms per sample: samples/s b / (20 + b) ms, 962/s at 512
    trials = [Trial(b, True, (0.020 + 0.001 * b,)) for b in (8, 16, 32, 64, 128, 256, 512)]
    # THEN the knee is the smallest batch within 5% of the fitted best (256: 927/s)
    assert time_optimal_batch(trials) == 256
    assert time_optimal_batch(trials, tolerance=0.0) == 512
    assert time_optimal_batch(trials, tolerance=0.2) == 128


def test_time_optimal_ignores_failed_trials() -> None:
    assert time_optimal_batch([_trial(8, 100), Trial(16, False)]) == 8
    assert time_optimal_batch([Trial(16, False)]) is None


# -- with a noise scale (McCandlish et al. 2018) --------------------------------------------
def _linear_time_trials(alpha: float, beta: float, batches) -> list[Trial]:
    """Trials whose step time is alpha + beta * B (B_half = alpha / beta)."""
    return [Trial(b, True, (alpha + beta * b,)) for b in batches]


def test_goodput_optimum_is_the_geometric_mean_of_saturation_and_noise() -> None:
    from bsfinder.core.recommend import goodput_optimal_batch

    # GIVEN t(B) = alpha + beta B with B_half = 64, and B_noise = 1024: B* = sqrt(64 * 1024)
    trials = _linear_time_trials(0.064, 0.001, [2**k for k in range(3, 13)])
    best, (low, high) = goodput_optimal_batch(trials, 1024.0)
    assert best == 256 and low <= 256 <= high
    # THEN the flat region holds the measured batches within 5% of the best time to target
    assert (low, high) == (256, 256)
    assert goodput_optimal_batch(trials, 1024.0, tolerance=0.3)[1] == (128, 512)
    # AND a larger noise scale moves the optimum up; a tiny one, down
    assert goodput_optimal_batch(trials, 16384.0)[0] == 1024
    assert goodput_optimal_batch(trials, 16.0)[0] == 32
    assert goodput_optimal_batch([Trial(8, False, ())], 100.0) is None


def test_the_goodput_optimum_between_two_trials_is_found_on_the_granularity() -> None:
    from bsfinder.core.recommend import goodput_candidates, goodput_optimal_batch

    # GIVEN trials 4x apart (as the search grows) with t(B) = alpha + beta B, B_half = 32,
    # and B_noise = 32: the optimum sqrt(32 * 32) = 32 lies between the trials at 16 and 64
    trials = _linear_time_trials(0.032, 0.001, [1, 4, 16, 64, 256, 1024])
    # THEN the power of two between them is the answer, on a granularity of 8...
    assert goodput_optimal_batch(trials, 32.0, granularity=8)[0] == 32
    assert goodput_candidates([1, 4, 16, 64, 200], 8) == [1, 4, 8, 16, 32, 64, 128, 200]
    # AND nothing off the granularity is added, nor anything past the largest fitting batch
    assert goodput_candidates([1, 4, 16, 64, 200], 24) == [1, 4, 16, 64, 200]
    assert goodput_candidates([8, 40], "pow2") == [8, 16, 32, 40]
    assert goodput_optimal_batch(trials, 32.0, granularity=24)[0] in (16, 64)


def test_noise_capped_rule_reduces_to_linear_and_saturates() -> None:
    from bsfinder.core.recommend import noise_capped_lr

    # B << B_noise: the linear rule (Goyal: 0.1 per 256 -> 3.2 at 8192)
    assert noise_capped_lr(0.1, 256, 8192, 1e12) == pytest.approx(3.2, rel=1e-6)
    # B >> B_noise: at most eta0 (1 + B_noise / B0)
    assert noise_capped_lr(0.1, 256, 10**9, 512) == pytest.approx(0.1 * 3, rel=1e-5)
    advice = scale_learning_rate(base_lr=0.1, base_batch=256, batch_size=8192,
                                 optimizer="sgd", noise_scale=1024.0)  # fmt: skip
    assert advice.rule == "noise"
    assert advice.lr == pytest.approx(0.1 * (1 + 1024 / 256) / (1 + 1024 / 8192), rel=1e-5)
    with pytest.raises(SpecError, match="noise scale"):
        scale_learning_rate(base_lr=0.1, base_batch=256, batch_size=512, rule="noise")


def test_adam_gets_sqrt_with_the_noise_ceiling_and_betas_advice() -> None:
    advice = scale_learning_rate(base_lr=1e-3, base_batch=32, batch_size=512,
                                 optimizer="adamw", noise_scale=256.0)  # fmt: skip
    assert advice.rule == "sqrt" and advice.lr == pytest.approx(4e-3)
    assert any("noise-capped rule" in a for a in advice.advice)
    assert any("Malladi" in a and "eps" in a for a in advice.advice)
    small = scale_learning_rate(base_lr=1e-3, base_batch=32, batch_size=64, optimizer="adamw")
    assert not any("Malladi" in a for a in small.advice)  # a 2x batch needs no betas advice


def test_adamw_weight_decay_keeps_its_timescale_in_epochs() -> None:
    from bsfinder.core.recommend import weight_decay_factor

    # sqrt rule, 16x batch: lr x 4, so wd x 16 / 4 keeps B / (lr * wd * N)
    advice = scale_learning_rate(base_lr=1e-3, base_batch=32, batch_size=512, optimizer="adamw")
    assert any("weight decay x 4 " in a and "Wang & Aitchison" in a for a in advice.advice)
    base, new = (
        32 / (1e-3 * 0.1),
        512 / (advice.lr * 0.1 * weight_decay_factor(1e-3, 32, advice.lr, 512)),
    )
    assert new == pytest.approx(base)  # the timescale, with N cancelled
    sgd = scale_learning_rate(base_lr=0.1, base_batch=32, batch_size=512, optimizer="sgd")
    assert not any("weight decay" in a for a in sgd.advice)


def test_plans_for_a_global_batch_fastest_first() -> None:
    from bsfinder.core.recommend import plan_global_batch

    trials = _linear_time_trials(0.064, 0.001, [32, 64, 128, 256])
    plans = plan_global_batch(trials, 1024, ranks=2, max_batch=256)
    # THEN every plan makes 1024 = micro x accumulation x 2, and the largest micro-batch
    # (most samples/s on a saturating device) is first
    assert all(p.global_batch == 1024 and p.ranks == 2 for p in plans)
    assert [(p.micro_batch, p.accumulation) for p in plans][:3] == [(256, 2), (128, 4), (64, 8)]
    first = plans[0]
    assert first.measured and first.samples_per_s == pytest.approx(2 * 256 / 0.32)
    assert first.optimizer_step_s == pytest.approx(2 * 0.32)
    # a micro-batch between measured ones is interpolated
    mid = plan_global_batch(trials, 96, max_batch=256)
    assert [(p.micro_batch, p.measured) for p in mid] == [(96, False), (48, False), (32, True)]
    assert mid[0].optimizer_step_s == pytest.approx(0.064 + 0.096)
    with pytest.raises(SpecError, match="evenly"):
        plan_global_batch(trials, 1000, ranks=3)
    with pytest.raises(SpecError, match="divides"):
        plan_global_batch(trials, 31)


def test_batch_growth_follows_the_noise_scale_within_memory() -> None:
    from bsfinder.core.growth import BatchGrowth

    trials = _linear_time_trials(0.064, 0.001, [2**k for k in range(3, 12)])
    rates = {t.batch_size: t.samples_per_s for t in trials}
    growth = BatchGrowth(rates, max_batch=512, base_lr=0.1, base_batch=32)
    batches = [growth.update(noise)[0] for noise in (16, 1024, 300, 16384)]
    # THEN it grows with the noise scale, never shrinks, never passes the memory maximum
    assert batches == [32, 256, 256, 512]
    assert growth.lr == pytest.approx(0.1 * (1 + 16384 / 32) / (1 + 16384 / 512), rel=1e-2)
    assert growth.update(None) == (512, growth.lr)  # no estimate yet: keep going
    adam = BatchGrowth(rates, max_batch=512, base_lr=1e-3, base_batch=32, optimizer="adamw")
    assert adam.update(16384)[1] == pytest.approx(1e-3 * (growth.lr / 0.1) ** 0.5, rel=1e-2)


def test_module_examples_hold() -> None:
    import doctest

    import bsfinder.core.growth
    import bsfinder.core.recommend

    for module in (bsfinder.core.recommend, bsfinder.core.growth):
        assert doctest.testmod(module).failed == 0
