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
    trials = [_trial(8, 500), _trial(16, 900), _trial(32, 960), _trial(64, 1000), _trial(128, 990)]
    assert time_optimal_batch(trials) == 32
    assert time_optimal_batch(trials, tolerance=0.0) == 64


def test_time_optimal_ignores_failed_trials() -> None:
    assert time_optimal_batch([_trial(8, 100), Trial(16, False)]) == 8
    assert time_optimal_batch([Trial(16, False)]) is None
