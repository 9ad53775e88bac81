"""Recommendations from measured trials: time-optimal batch and learning-rate scaling.

Sources (see docs/science.md): the linear rule with warm-up (Goyal et al. 2017), the square
root rule for Adam-family optimizers (Malladi et al. 2022), and "past the throughput knee a
larger batch costs examples without saving time" (McCandlish et al. 2018).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bsfinder.errors import SpecError
from bsfinder.results import LearningRateAdvice, Trial

__all__ = ["LR_RULES", "lr_rule_for", "scale_learning_rate", "time_optimal_batch"]

LR_RULES = ("auto", "linear", "sqrt", "none")
#: Goyal et al. warm up linearly over 5 epochs when the batch grows by k.
WARMUP_EPOCHS = 5.0


def time_optimal_batch(trials: Sequence[Trial], *, tolerance: float = 0.05) -> int | None:
    """Smallest fitting batch whose samples/s is within ``tolerance`` of the best measured.

    Larger batches past that knee do not train faster per second but need more examples to
    reach the same loss, so they are not recommended just because they fit.

    Example:
        >>> ts = [Trial(b, True, (b / r,)) for b, r in [(8, 80), (16, 97), (32, 100)]]
        >>> time_optimal_batch(ts)
        16
    """
    rates = [(t.batch_size, t.samples_per_s) for t in trials if t.fits and t.samples_per_s]
    if not rates:
        return None
    best = max(rate for _, rate in rates)
    return min(b for b, rate in rates if rate is not None and rate >= (1 - tolerance) * best)


def lr_rule_for(optimizer: str) -> str:
    """The scaling rule for an optimizer family: linear for SGD, square root for Adam-family."""
    return "linear" if optimizer == "sgd" else "sqrt"


def scale_learning_rate(
    *,
    base_lr: float,
    base_batch: int,
    batch_size: int,
    rule: str = "auto",
    optimizer: str = "adamw",
    dataset_size: int | None = None,
) -> LearningRateAdvice:
    """Scale a learning rate tuned at ``base_batch`` to ``batch_size``.

    Args:
        base_lr: learning rate known to work at ``base_batch``.
        base_batch: the batch it was tuned at.
        batch_size: the batch to train at.
        rule: ``linear`` (lr x k), ``sqrt`` (lr x sqrt(k)), ``none`` or ``auto`` (by optimizer).
        optimizer: decides ``auto``: ``sgd`` -> linear, Adam-family -> sqrt.
        dataset_size: samples per epoch, to express the warm-up in steps.

    Raises:
        SpecError: a non-positive value or an unknown rule.

    Example:
        >>> scale_learning_rate(base_lr=0.1, base_batch=256, batch_size=8192, rule="linear").lr
        3.2
    """
    if not base_lr > 0 or not math.isfinite(base_lr):
        raise SpecError(f"--base-lr must be a positive number, got {base_lr}")
    if base_batch < 1 or batch_size < 1:
        raise SpecError("--base-batch and the batch size must be >= 1")
    if rule not in LR_RULES:
        raise SpecError(f"--lr-rule {rule!r}: use one of {', '.join(LR_RULES)}")
    if rule == "auto":
        rule = lr_rule_for(optimizer)
    factor = batch_size / base_batch
    if rule == "linear":
        lr = base_lr * factor
        note = "linear rule for SGD (Goyal et al. 2017): lr x k, with gradual warm-up"
    elif rule == "sqrt":
        lr = base_lr * math.sqrt(factor)
        note = "square-root rule for Adam-family (Malladi et al. 2022): lr x sqrt(k)"
    else:
        lr = base_lr
        note = "no scaling requested"
    lr = float(f"{lr:.6g}")
    warmup_epochs = WARMUP_EPOCHS if rule != "none" and factor >= 2 else 0.0
    warmup_steps = None
    if dataset_size is not None and warmup_epochs:
        warmup_steps = math.ceil(warmup_epochs * dataset_size / batch_size)
    if warmup_epochs:
        note += f"; warm up linearly from {base_lr:g} over ~{warmup_epochs:g} epochs (Goyal)"
    return LearningRateAdvice(
        rule=rule,
        base_lr=base_lr,
        base_batch=base_batch,
        batch_size=batch_size,
        lr=lr,
        warmup_epochs=warmup_epochs,
        warmup_steps=warmup_steps,
        note=note,
    )
