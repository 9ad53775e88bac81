"""Recommendations from measured trials: time-optimal batch and learning-rate scaling.

Sources (see docs/science.md): the linear rule with warm-up (Goyal et al. 2017), the square
root rule for Adam-family optimizers (Malladi et al. 2022), and "past the throughput knee a
larger batch costs examples without saving time" (McCandlish et al. 2018).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from bsfinder.core.results import LearningRateAdvice, Trial
from bsfinder.errors import SpecError
from bsfinder.options import LR_RULES, Granularity

__all__ = [
    "ACCUMULATION_CAVEATS",
    "LR_RULES",
    "BatchPlan",
    "ThroughputModel",
    "TimeOptimal",
    "fit_throughput",
    "goodput_candidates",
    "goodput_choice",
    "goodput_optimal_batch",
    "lr_rule_for",
    "noise_capped_lr",
    "plan_global_batch",
    "scale_learning_rate",
    "step_time_spread",
    "time_optimal",
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


#: relative throughput model: candidates up to this many times the largest timed batch are
#: answered by extrapolation (the memory edge lies within 2x of the last doubling)
EXTRAPOLATE_FACTOR = 2.0
#: the time-optimal batch is flagged noisy when fewer resamples than this agree with it
STABLE_AGREEMENT = 0.8
#: resamples of the bootstrap that decides whether the answer is noisy (seeded: the same
#: trials always give the same verdict)
RESAMPLES = 200


@dataclass(frozen=True)
class ThroughputModel:
    """Step time ``t(b) = fixed_s + per_sample_s * b + per_sample2_s * b**2``, all terms >= 0.

    The fixed part is launch and optimizer overhead, the linear part the work per sample; the
    quadratic part appears on CPU, where a batch that outgrows the caches costs more per sample
    and throughput falls past a peak (measured: the committed compare fixtures and a
    2-core SmallCNN probe peak near 256-512). It is only kept when the data need it (AICc).

    A device that runs small batches in parallel has a flat step time until it saturates,
    then a linear one (FakeRunner's ``saturating`` curve, GPUs): a hinge at
    ``saturation_batch`` adds ``per_sample_past_s`` per sample past it. The smooth fit put
    that knee at 256 where it is 64; the hinge, tried at each timed batch, is kept when AICc
    prefers it.

    Attributes:
        fixed_s, per_sample_s, per_sample2_s, per_sample_past_s: the fitted terms, seconds.
        saturation_batch: where the hinge is (None: no hinge).
        points: timed trials the fit used.
        residual: root mean square of the relative residuals ``ln(t / t_model)``, corrected
            for the fitted terms (0 for a perfect or exactly determined fit).
    """

    fixed_s: float
    per_sample_s: float
    per_sample2_s: float
    points: int
    residual: float
    saturation_batch: float | None = None
    per_sample_past_s: float = 0.0

    def step_s(self, batch: float) -> float:
        past = 0.0
        if self.saturation_batch is not None:
            past = self.per_sample_past_s * max(0.0, batch - self.saturation_batch)
        return self.fixed_s + self.per_sample_s * batch + self.per_sample2_s * batch * batch + past

    def samples_per_s(self, batch: float) -> float:
        step = self.step_s(batch)
        return batch / step if step > 0 else math.inf


@dataclass(frozen=True)
class TimeOptimal:
    """The time-optimal batch from a fitted throughput model, and how sure it is.

    Attributes:
        batch: the smallest fitting batch whose modelled samples/s is within the tolerance of
            the best modelled over the candidates (None without a fitting, timed trial).
        noisy: fewer than :data:`STABLE_AGREEMENT` of the bootstrap resamples agree.
        agreement: the fraction of resamples that gave ``batch`` (1.0 without noise).
        low, high: the 5th-95th percentile of the resampled answers (``batch`` when stable).
        step_time_spread: the probe's noise level: the median over timed trials of
            :attr:`Trial.step_time_spread` (None when no trial has two timed steps).
        model: the fit (None with fewer than two timed batches: then ``batch`` is the
            fastest measured).
    """

    batch: int | None
    noisy: bool = False
    agreement: float = 1.0
    low: int | None = None
    high: int | None = None
    step_time_spread: float | None = None
    model: ThroughputModel | None = None


def step_time_spread(trials: Sequence[Trial]) -> float | None:
    """The median of the trials' :attr:`Trial.step_time_spread`: one noisy trial does not make
    a noisy machine, half of them do. None when no trial has two timed steps."""
    spreads = [s for t in trials if (s := t.step_time_spread) is not None]
    return statistics.median(spreads) if spreads else None


def fit_throughput(points: Sequence[tuple[float, float]]) -> ThroughputModel | None:
    """Fit :class:`ThroughputModel` to ``(batch, median step seconds)`` points.

    Weighted least squares on relative error (weights ``1 / t**2``: step times span orders of
    magnitude and their noise is proportional to them), every term non-negative (exact
    non-negative least squares by trying each subset of terms). The line ``t0 + c b`` always;
    with five or more distinct batches also the quadratic and the hinge at each inner timed
    batch, kept when the small-sample AIC prefers them. None with fewer than two distinct
    batches.
    """
    usable = [(float(b), float(t)) for b, t in points if t > 0]
    batches = sorted({b for b, _ in usable})
    if len(batches) < 2:
        return None
    n = len(usable)
    best: tuple[float, ThroughputModel, int] | None = None
    shapes: list[tuple[tuple[str, ...], float | None]] = [(("1", "b"), None)]
    if len(batches) >= 5:
        shapes.append((("1", "b", "b2"), None))
        shapes += [(("1", "b", "hinge"), k) for k in batches[1:-2]]
    for allowed, hinge in shapes:
        found = _nnls(usable, allowed, hinge)
        if found is None:
            continue
        sse, model, terms = found
        # the hinge's place is fitted too: one more parameter
        score = _aicc(sse, n, terms + (hinge is not None))
        if best is None or score < best[0] - 1e-9:
            best = (score, model, terms)
    if best is None:
        return None
    _, model, terms = best
    logs = [math.log(t / model.step_s(b)) for b, t in usable if model.step_s(b) > 0]
    dof = len(logs) - terms - (model.saturation_batch is not None)
    residual = math.sqrt(sum(r * r for r in logs) / dof) if dof > 0 else 0.0
    return replace(model, points=n, residual=residual)


def _basis(term: str, batch: float, hinge: float | None) -> float:
    if term == "1":
        return 1.0
    if term == "b":
        return batch
    if term == "b2":
        return batch * batch
    return max(0.0, batch - (hinge or 0.0))


def _nnls(
    points: Sequence[tuple[float, float]], allowed: tuple[str, ...], hinge: float | None
) -> tuple[float, ThroughputModel, int] | None:
    """Non-negative weighted least squares over the terms in ``allowed``: the feasible subset
    fit with the least relative squared error (exact for so few terms). Returns
    ``(sse, model, terms used)``."""
    best: tuple[float, ThroughputModel, int] | None = None
    for size in range(1, len(allowed) + 1):
        for terms in itertools.combinations(allowed, size):
            if "hinge" in allowed and "hinge" not in terms:
                continue  # without its hinge term the shape is the plain line, tried already
            rows = [[_basis(j, b, hinge) / t for j in terms] for b, t in points]
            coef = _least_squares(rows)
            if coef is None or min(coef) < 0:
                continue
            value = dict(zip(terms, coef, strict=True))
            model = ThroughputModel(
                fixed_s=value.get("1", 0.0),
                per_sample_s=value.get("b", 0.0),
                per_sample2_s=value.get("b2", 0.0),
                points=len(points),
                residual=0.0,
                saturation_batch=hinge if "hinge" in terms else None,
                per_sample_past_s=value.get("hinge", 0.0),
            )
            sse = sum((1 - model.step_s(b) / t) ** 2 for b, t in points)
            if best is None or sse < best[0] * (1 - 1e-12):
                best = (sse, model, size)
    return best


def _aicc(sse: float, n: int, k: int) -> float:
    """Small-sample Akaike criterion of a least-squares fit (lower is better)."""
    if n - k - 1 <= 0:
        return math.inf
    return n * math.log(max(sse, 1e-300) / n) + 2 * k + 2 * k * (k + 1) / (n - k - 1)


def _least_squares(rows: Sequence[Sequence[float]]) -> list[float] | None:
    """Least squares of ``rows @ c = 1`` (relative error: each row is divided by its ``t``)."""
    size = len(rows[0])
    normal = [[sum(r[i] * r[j] for r in rows) for j in range(size)] for i in range(size)]
    rhs = [sum(r[i] for r in rows) for i in range(size)]
    return _solve(normal, rhs)


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(rhs)
    a = [[*row, value] for row, value in zip(matrix, rhs, strict=True)]
    scale = max((abs(v) for row in matrix for v in row), default=0.0)
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) <= 1e-13 * scale:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for c in range(col, n + 1):
                a[r][c] -= f * a[col][c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (a[r][n] - sum(a[r][c] * out[c] for c in range(r + 1, n))) / a[r][r]
    return out


def _timed_points(trials: Sequence[Trial]) -> list[tuple[int, float]]:
    return [(t.batch_size, step) for t in trials if t.fits and (step := t.step_s)]


def _candidates(trials: Sequence[Trial], timed: Sequence[tuple[int, float]]) -> list[int]:
    """Fitting batches the model may answer: from the smallest timed batch (below it fixed
    costs are not measured) to :data:`EXTRAPOLATE_FACTOR` x the largest timed one."""
    low = min(b for b, _ in timed)
    high = EXTRAPOLATE_FACTOR * max(b for b, _ in timed)
    return sorted({t.batch_size for t in trials if t.fits and low <= t.batch_size <= high})


def _knee(model: ThroughputModel, candidates: Sequence[int], tolerance: float) -> int:
    rates = [(b, model.samples_per_s(b)) for b in candidates]
    best = max(rate for _, rate in rates)
    return min(b for b, rate in rates if rate >= (1 - tolerance) * best)


def _fastest_measured(timed: Sequence[tuple[int, float]]) -> int:
    return max(timed, key=lambda p: (p[0] / p[1], -p[0]))[0]


def time_optimal(
    trials: Sequence[Trial],
    *,
    tolerance: float = 0.05,
    choose: Callable[[ThroughputModel, Sequence[int]], int] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> TimeOptimal:
    """The time-optimal batch from the fitted throughput model, with a seeded bootstrap that
    says whether reruns would agree.

    The model (:func:`fit_throughput`) pools every timed trial, so one slow trial moves the
    answer far less than it moves "the best measured point" (which flipped 64 <-> 527 between
    reruns of one CNN on a busy 2-core machine). Untimed fitting trials are candidates too,
    up to :data:`EXTRAPOLATE_FACTOR` x the largest timed batch.

    The bootstrap (seeded) redraws each timed trial's median step time as the measured one
    times ``exp(N(0, residual))``, the scatter the medians showed around the fit (which holds
    the within-trial spread as far as it moves a median, and the load changing between
    trials), refits, model choice included, and re-answers ``resamples`` times. Drawing around
    the model instead was overconfident where the chosen shape was wrong (a saturating curve
    read as a line under 10% noise: "512, 96% agree" where the knee is 64); resampling each
    trial's own steps on top counted the within-trial noise twice. The answer is noisy when
    fewer than :data:`STABLE_AGREEMENT` of the resamples agree with it; ``low``-``high`` is
    then the range reruns are likely to give.

    Args:
        choose: the rule on the model (default: the throughput knee within ``tolerance``);
            :func:`goodput_optimal_batch` passes its time-to-target rule.
    """
    timed = _timed_points(trials)
    spread = step_time_spread([t for t in trials if t.fits])
    if not timed:
        return TimeOptimal(None, step_time_spread=spread)
    rule = choose or (lambda m, c: _knee(m, c, tolerance))
    model = fit_throughput(timed)
    if model is None:
        batch = _fastest_measured(timed)
        return TimeOptimal(batch, low=batch, high=batch, step_time_spread=spread)
    candidates = _candidates(trials, timed)
    batch = rule(model, candidates)
    rng = random.Random(seed)
    # a residual of 1e-9 is float rounding of an exact fit, not noise
    sigma = model.residual if model.residual > 1e-9 else 0.0
    answers = []
    for _ in range(resamples if sigma else 0):
        refit = fit_throughput([(b, t * math.exp(rng.gauss(0, sigma))) for b, t in timed])
        answers.append(batch if refit is None else rule(refit, candidates))
    if not answers:
        return TimeOptimal(batch, low=batch, high=batch, step_time_spread=spread, model=model)
    answers.sort()
    agreement = answers.count(batch) / len(answers)
    low = min(batch, answers[int(0.05 * (len(answers) - 1))])
    high = max(batch, answers[round(0.95 * (len(answers) - 1))])
    noisy = agreement < STABLE_AGREEMENT
    if not noisy:
        low = high = batch
    return TimeOptimal(batch, noisy, agreement, low, high, spread, model)


def time_optimal_batch(trials: Sequence[Trial], *, tolerance: float = 0.05) -> int | None:
    """Smallest fitting batch whose modelled samples/s is within ``tolerance`` of the best.

    The samples/s come from a step-time model fitted to every timed trial
    (:func:`fit_throughput`), not from the single best measured point, so that reruns on a
    busy machine agree; :func:`time_optimal` also says whether they would. Larger batches
    past that knee do not train faster per second but need more examples to reach the same
    loss, so they are not recommended just because they fit.

    Example:
        >>> ts = [Trial(b, True, (0.02 + 0.001 * b,)) for b in (8, 16, 32, 64, 128, 256, 512)]
        >>> time_optimal_batch(ts)  # 20 ms fixed + 1 ms per sample: 95% of the best at 512
        256
    """
    return time_optimal(trials, tolerance=tolerance).batch


def goodput_optimal_batch(
    trials: Sequence[Trial],
    noise_scale: float,
    *,
    tolerance: float = 0.05,
    granularity: Granularity = 1,
) -> tuple[int, tuple[int, int]] | None:
    """The batch that reaches a target loss soonest, and the flat region around it.

    Wall time to a target ~ steps x step time ~ ``(B + B_noise) / X(B)`` (McCandlish et al.
    2018, steps ``S = S_min (1 + B_noise / B)``; Pollux's goodput), ``X`` the samples/s of
    the fitted throughput model (:func:`fit_throughput`, as the knee uses; the measured
    samples/s with a single timed batch). The candidates are the fitting batches and the
    powers of two between them on ``granularity`` (:func:`goodput_candidates`): the search
    grows by 4x, and the optimum of a smooth cost often lies between two of its trials
    (DigitsNet with BatchNorm: 32, between trials at 16 and 64). Returns the batch
    minimising it and the smallest and largest candidate within ``tolerance`` of that
    minimum (None without a fitting, timed trial).

    Example:
        >>> ts = [Trial(b, True, (b / r,)) for b, r in [(8, 50), (64, 90), (512, 100)]]
        >>> goodput_optimal_batch(ts, 100.0)
        (32, (32, 32))
    """
    timed = _timed_points(trials)
    if not timed:
        return None
    noise = noise_scale if math.isfinite(noise_scale) else 1e30
    model = fit_throughput(timed)
    if model is None:
        rates = [(b, b / t) for b, t in timed]
    else:
        candidates = goodput_candidates(_candidates(trials, timed), granularity)
        rates = [(b, model.samples_per_s(b)) for b in candidates]
    costs = sorted(((b + noise) / rate, b) for b, rate in rates)
    best_cost, best = costs[0]
    flat = [b for cost, b in costs if cost <= (1 + tolerance) * best_cost]
    return best, (min(flat), max(flat))


def goodput_candidates(candidates: Sequence[int], granularity: Granularity = 1) -> list[int]:
    """``candidates`` and the powers of two between the smallest and the largest of them
    that are on ``granularity`` (a multiple of it, or any with ``"pow2"``): batches the
    fitted model interpolates, below a batch known to fit.

    Example:
        >>> goodput_candidates([1, 4, 16, 64, 200], 8)
        [1, 4, 8, 16, 32, 64, 128, 200]
    """
    if not candidates:
        return []
    low, high = min(candidates), max(candidates)
    step = 1 if granularity == "pow2" else granularity
    powers = {2**k for k in range(high.bit_length()) if low <= 2**k <= high and 2**k % step == 0}
    return sorted(set(candidates) | powers)


def goodput_choice(
    noise_scale: float, tolerance: float = 0.05, granularity: Granularity = 1
) -> Callable[..., int]:
    """The goodput rule as a :func:`time_optimal` ``choose``: the batch minimising
    ``(B + B_noise) / X(B)`` on the model, over :func:`goodput_candidates`."""
    noise = noise_scale if math.isfinite(noise_scale) else 1e30

    def choose(model: ThroughputModel, candidates: Sequence[int]) -> int:
        return min(
            goodput_candidates(candidates, granularity),
            key=lambda b: ((b + noise) / model.samples_per_s(b), b),
        )

    return choose


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
    if optimizer == "adamw" and factor != 1 and rule != "none":
        advice.append(weight_decay_advice(base_lr, base_batch, lr, batch_size))
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


def weight_decay_factor(base_lr: float, base_batch: int, lr: float, batch_size: int) -> float:
    """How much to multiply AdamW's weight decay by when ``(base_lr, base_batch)`` becomes
    ``(lr, batch_size)``, keeping its timescale in epochs, ``B / (lr * wd * N)``, constant
    (Wang & Aitchison 2024, "How to set AdamW's weight decay as you scale model and dataset
    size": the EMA AdamW's decay forms has a time constant of ``1 / (lr * wd)`` steps):
    ``(B / B0) * (lr0 / lr)``."""
    return (batch_size / base_batch) * (base_lr / lr)


def weight_decay_advice(base_lr: float, base_batch: int, lr: float, batch_size: int) -> str:
    """One line of :func:`weight_decay_factor` advice."""
    factor = weight_decay_factor(base_lr, base_batch, lr, batch_size)
    return (
        f"AdamW: weight decay x {factor:.3g} keeps its timescale B / (lr x wd x N) in epochs "
        f"(Wang & Aitchison 2024), from {base_lr:g} @ {base_batch} to {lr:.3g} @ {batch_size}"
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
