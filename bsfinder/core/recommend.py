"""Recommendations from measured trials: time-optimal batch and learning-rate scaling.

Sources (see docs/science.md): the linear rule with warm-up (Goyal et al. 2017), the square
root rule for Adam-family optimizers (Malladi et al. 2022), and "past the throughput knee a
larger batch costs examples without saving time" (McCandlish et al. 2018).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from bsfinder.core.results import LearningRateAdvice, Trial
from bsfinder.errors import SpecError
from bsfinder.options import LR_RULES

__all__ = [
    "ACCUMULATION_CAVEATS",
    "LR_RULES",
    "BatchPlan",
    "goodput_optimal_batch",
    "lr_rule_for",
    "noise_capped_lr",
    "plan_global_batch",
    "scale_learning_rate",
    "time_optimal_batch",
]

#: what makes gradient accumulation exactly a bigger batch (and what breaks it)
ACCUMULATION_CAVEATS = (
    "normalise the loss by the total count over all micro-batches of an optimizer step "
    "(tokens for language models), not per micro-batch",
    "BatchNorm statistics and in-batch negatives see one micro-batch, not the global batch",
    "step the scheduler, clip gradients and update the GradScaler once per optimizer step",
    "accumulate gradients in fp32",
)
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


def goodput_optimal_batch(
    trials: Sequence[Trial], noise_scale: float, *, tolerance: float = 0.05
) -> tuple[int, tuple[int, int]] | None:
    """The measured batch that reaches a target loss soonest, and the flat region around it.

    Wall time to a target ~ steps x step time ~ ``(B + B_noise) / X(B)`` (McCandlish et al.
    2018, steps ``S = S_min (1 + B_noise / B)``; Pollux's goodput), ``X`` the measured
    samples/s. Returns the batch minimising it and the smallest and largest measured batch
    within ``tolerance`` of that minimum (None without a fitting, timed trial).

    Example:
        >>> ts = [Trial(b, True, (b / r,)) for b, r in [(8, 50), (64, 90), (512, 100)]]
        >>> goodput_optimal_batch(ts, 100.0)
        (64, (64, 64))
    """
    rates = [(t.batch_size, t.samples_per_s) for t in trials if t.fits and t.samples_per_s]
    if not rates:
        return None
    noise = noise_scale if math.isfinite(noise_scale) else 1e30

    def time_to_target(batch: int, rate: float) -> float:
        return (batch + noise) / rate

    costs = sorted((time_to_target(b, r), b) for b, r in rates)
    best_cost, best = costs[0]
    flat = [b for cost, b in costs if cost <= (1 + tolerance) * best_cost]
    return best, (min(flat), max(flat))


def noise_capped_lr(base_lr: float, base_batch: int, batch_size: int, noise_scale: float) -> float:
    """``eta0 (1 + B_noise / B0) / (1 + B_noise / B)`` (McCandlish et al. 2018; AdaScale's gain):
    linear while ``B << B_noise``, saturating at ``eta0 (1 + B_noise / B0)`` beyond it.

    Example:
        >>> round(noise_capped_lr(0.1, 256, 8192, 1e9), 4)  # B << B_noise: the linear rule
        3.2
        >>> round(noise_capped_lr(0.1, 256, 8192, 256), 4)  # B >> B_noise: at most 2 eta0
        0.1939
    """
    if not math.isfinite(noise_scale):
        return base_lr * batch_size / base_batch
    return base_lr * (1 + noise_scale / base_batch) / (1 + noise_scale / batch_size)


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
    noise_scale: float | None = None,
) -> LearningRateAdvice:
    """Scale a learning rate tuned at ``base_batch`` to ``batch_size``.

    Args:
        base_lr: learning rate known to work at ``base_batch``.
        base_batch: the batch it was tuned at.
        batch_size: the batch to train at.
        rule: ``linear`` (lr x k), ``sqrt`` (lr x sqrt(k)), ``noise`` (the noise-capped rule,
            :func:`noise_capped_lr`), ``none`` or ``auto``: SGD -> ``noise`` when the noise
            scale is known, else ``linear``; Adam-family -> ``sqrt``.
        optimizer: decides ``auto``.
        dataset_size: samples per epoch, to express the warm-up in steps.
        noise_scale: the gradient noise scale ``B_noise`` in samples, if measured.

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
    if rule == "noise" and noise_scale is None:
        raise SpecError("--lr-rule noise needs the noise scale: pass --data to measure it")
    if rule == "auto":
        rule = lr_rule_for(optimizer)
        if rule == "linear" and noise_scale is not None:
            rule = "noise"
    factor = batch_size / base_batch
    advice: list[str] = []
    if rule == "noise":
        assert noise_scale is not None
        lr = noise_capped_lr(base_lr, base_batch, batch_size, noise_scale)
        note = (
            f"noise-capped rule (McCandlish et al. 2018) with B_noise {noise_scale:.3g}: "
            "lr x (1 + B_noise/B0) / (1 + B_noise/B), linear while B << B_noise"
        )
    elif rule == "linear":
        lr = base_lr * factor
        note = "linear rule for SGD (Goyal et al. 2017): lr x k, with gradual warm-up"
    elif rule == "sqrt":
        lr = base_lr * math.sqrt(factor)
        note = "square-root rule for Adam-family (Malladi et al. 2022): lr x sqrt(k)"
    else:
        lr = base_lr
        note = "no scaling requested"
    if rule == "sqrt" and noise_scale is not None and math.isfinite(noise_scale):
        capped = noise_capped_lr(base_lr, base_batch, batch_size, noise_scale)
        advice.append(
            f"the noise-capped rule (derived for SGD) gives {capped:.3g} with B_noise "
            f"{noise_scale:.3g}: past B_noise a larger lr buys little"
        )
    if rule == "sqrt" and factor >= 4:
        # Malladi et al. 2022's SDE scaling for Adam: beta -> 1 - k (1 - beta), eps / sqrt(k)
        beta2 = 1 - factor * (1 - 0.999)
        beta1 = 1 - factor * (1 - 0.9)
        betas = (
            f"betas ({beta1:.3g}, {beta2:.4g})"
            if beta1 > 0.5 and beta2 > 0.9
            else "beta1, beta2 and eps as k(1 - beta) << 1 allows"
        )
        advice.append(
            f"for a {factor:.3g}x batch with Adam, Malladi et al. 2022 also scale beta -> "
            f"1 - k (1 - beta) and eps -> eps / sqrt(k): from (0.9, 0.999), {betas}; "
            "well-tuned Adam also matches LAMB at large batch (Nado et al. 2021)"
        )
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
        advice=tuple(advice),
    )


@dataclass(frozen=True)
class BatchPlan:
    """One way to train at a global batch: micro-batch x accumulation x ranks.

    Attributes:
        micro_batch: samples per forward/backward on one rank.
        accumulation: micro-batches accumulated per optimizer step.
        ranks: data-parallel ranks (GPUs).
        samples_per_s: all ranks together, from the throughput measured at ``micro_batch``
            (interpolated between measured batches when ``measured`` is False), assuming
            ranks scale perfectly (communication not included: an upper bound for ranks > 1).
        optimizer_step_s: wall time of one optimizer step (all micro-batches).
        measured: ``micro_batch`` itself was a probe trial.
    """

    micro_batch: int
    accumulation: int
    ranks: int
    samples_per_s: float
    optimizer_step_s: float
    measured: bool

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.ranks


def plan_global_batch(
    trials: Sequence[Trial], global_batch: int, *, ranks: int = 1, max_batch: int | None = None
) -> tuple[BatchPlan, ...]:
    """Every micro-batch x accumulation x ranks that makes ``global_batch`` from measured
    throughputs, fastest first.

    Micro-batches are the divisors of ``global_batch / ranks`` that fit (up to ``max_batch``)
    and lie within the measured range; their step time is measured or interpolated linearly
    between the nearest measured batches. Accumulation never raises samples/s: it only
    reaches a global batch that does not fit at once.

    Raises:
        SpecError: the global batch is not a positive multiple of ``ranks``, or no measured
            throughput covers a micro-batch that makes it.
    """
    if global_batch < 1 or ranks < 1:
        raise SpecError("--global-batch and --gpus must be >= 1")
    if global_batch % ranks:
        raise SpecError(
            f"global batch {global_batch} does not split evenly over {ranks} ranks; use a "
            f"multiple of {ranks}"
        )
    timed = sorted(
        (t.batch_size, t.step_s)
        for t in trials
        if t.fits and t.step_s and (max_batch is None or t.batch_size <= max_batch)
    )
    if not timed:
        raise SpecError("no fitting, timed trial to plan from")
    per_rank = global_batch // ranks
    low, high = timed[0][0], timed[-1][0]
    plans = []
    for micro in range(1, min(per_rank, high) + 1):
        if per_rank % micro or micro < low:
            continue
        step = _step_time(timed, micro)
        accumulation = per_rank // micro
        plans.append(
            BatchPlan(
                micro_batch=micro,
                accumulation=accumulation,
                ranks=ranks,
                samples_per_s=ranks * micro / step,
                optimizer_step_s=accumulation * step,
                measured=any(b == micro for b, _ in timed),
            )
        )
    if not plans:
        raise SpecError(
            f"no micro-batch between the measured {low} and {high} divides {per_rank} "
            f"(global batch {global_batch} over {ranks} ranks)"
        )
    return tuple(sorted(plans, key=lambda p: (-p.samples_per_s, p.accumulation)))


def _step_time(timed: list[tuple[int, float]], batch: int) -> float:
    """Step time at ``batch``: measured, or linear between the nearest measured batches."""
    for (b0, t0), (b1, t1) in itertools.pairwise(timed):
        if b0 <= batch <= b1:
            return t0 if b1 == b0 else t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
    return timed[-1][1] if batch == timed[-1][0] else timed[0][1]
