"""The gradient noise scale of a model on its data (McCandlish et al. 2018, "An Empirical
Model of Large-Batch Training"), measured with micro-batches at fixed parameters.

``B_simple = tr(Sigma) / |G|^2``: the per-example gradient variance over the squared true
gradient. Batches much smaller than it waste steps (each is mostly noise); batches much
larger waste examples. From ``k`` micro-batch gradients ``g_i`` of ``b`` samples each, at the
same parameters, with ``A`` the mean of ``|g_i|^2`` and ``C = |mean g_i|^2``:

    |G|^2     ~ (k C - A) / (k - 1)
    tr(Sigma) ~ b k (A - C) / (k - 1)

both unbiased. :class:`GradientNoise` collects ``A`` and ``C`` with gradient hooks (fp32
norms, the AMP loss scale divided out, non-finite micro-batches skipped) and smooths the
numerator and denominator separately (EMA) before dividing, as AdaptDL does; it works inside a
training loop as well as in :func:`measure_noise_scale`, which adds a confidence interval from
repeated estimates.

The noise scale grows as the loss falls: measured on freshly initialised weights it is small,
and it says so. Load trained weights (``--checkpoint``) to measure where training will be.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from bsfinder.errors import SpecError

__all__ = ["GradientNoise", "NoiseScale", "measure_noise_scale", "noise_scale_from_groups"]

#: bootstrap resamples for the confidence interval (fixed seed: the same data give the same
#: interval)
_BOOTSTRAP = 2000
_EARLY_NOTE = (
    "measured on the weights as given: the noise scale grows as the loss falls (often 10x "
    "or more over a run), so an estimate near initialisation is a lower bound; measure a "
    "checkpoint (--checkpoint) to see where training will be"
)


@dataclass(frozen=True)
class NoiseScale:
    """A gradient noise scale estimate, in samples.

    Attributes:
        b_simple: ``tr(Sigma) / |G|^2`` from all groups (ratio of the mean numerator and
            mean denominator); ``inf`` when ``|G|^2`` is not measurably above zero.
        low, high: a 95% interval (bootstrap over the groups).
        grad_sq_norm: the estimate of ``|G|^2``.
        trace: the estimate of ``tr(Sigma)``.
        micro_batch: samples per micro-batch; micro_batches: micro-batches per group;
            groups: groups measured (each at fixed parameters).
        estimates: ``B_simple`` of each group alone.
        skipped: micro-batches dropped because a gradient was not finite.
        seconds: wall time of the measurement.
        note: how to read it.
    """

    b_simple: float
    low: float
    high: float
    grad_sq_norm: float
    trace: float
    micro_batch: int
    micro_batches: int
    groups: int
    estimates: tuple[float, ...] = ()
    skipped: int = 0
    seconds: float = 0.0
    note: str = _EARLY_NOTE

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (infinities as None)."""
        data = asdict(self)
        for key in ("b_simple", "low", "high"):
            if not math.isfinite(data[key]):
                data[key] = None
        data["estimates"] = [e if math.isfinite(e) else None for e in self.estimates]
        return data


def noise_scale_from_groups(
    groups: list[tuple[float, float]] | list[tuple[float, float, int]],
    *,
    micro_batch: int,
    micro_batches: int,
    seed: int = 0,
) -> NoiseScale:
    """The noise scale from ``(A, C)`` of several groups of ``micro_batches`` micro-batches of
    ``micro_batch`` samples, or ``(A, C, k)`` where groups differ in size (pure: the
    statistics, the ratio and its bootstrap interval)."""
    if not groups:
        raise SpecError("no group of micro-batches was measured")
    sized = [(g[0], g[1], g[2] if len(g) > 2 else micro_batches) for g in groups]
    if min(k for _, _, k in sized) < 2:
        raise SpecError("the noise scale needs at least 2 micro-batches per group")
    b = micro_batch
    g2 = [(k * c - a) / (k - 1) for a, c, k in sized]
    tr = [b * k * (a - c) / (k - 1) for a, c, k in sized]

    def ratio(indices: Iterable[int]) -> float:
        chosen = list(indices)
        num = sum(tr[i] for i in chosen) / len(chosen)
        den = sum(g2[i] for i in chosen) / len(chosen)
        return max(num, 0.0) / den if den > 0 else math.inf

    n = len(groups)
    estimate = ratio(range(n))
    rng = random.Random(seed)
    samples = sorted(ratio(rng.choices(range(n), k=n)) for _ in range(_BOOTSTRAP))
    low = samples[int(0.025 * (_BOOTSTRAP - 1))]
    high = samples[math.ceil(0.975 * (_BOOTSTRAP - 1))]
    return NoiseScale(
        b_simple=estimate,
        low=low,
        high=high,
        grad_sq_norm=sum(g2) / n,
        trace=sum(tr) / n,
        micro_batch=b,
        micro_batches=max(k for _, _, k in sized),
        groups=n,
        estimates=tuple(ratio([i]) for i in range(n)),
    )


class GradientNoise:
    """Micro-batch gradient statistics through gradient hooks, for a training loop or a probe.

    Wrap each micro-batch's backward in :meth:`micro_batch`; after ``k >= 2`` of them at the
    same parameters (gradient accumulation), :meth:`end_group` adds the group's statistics
    and updates the EMA-smoothed estimate :attr:`b_simple`.

    Example:
        >>> noise = GradientNoise(model, micro_batch=32)  # doctest: +SKIP
        >>> for x, y in split(batch, 4):  # doctest: +SKIP
        ...     with noise.micro_batch(scale=scaler.get_scale()):
        ...         scaler.scale(loss_fn(model(x), y)).backward()
        >>> noise.end_group(); noise.b_simple  # doctest: +SKIP
    """

    def __init__(self, model: Any, *, micro_batch: int, ema: float = 0.9) -> None:
        if not 0 <= ema < 1:
            raise SpecError(f"ema must be in [0, 1), got {ema}")
        self.micro_batch_size = micro_batch
        self.ema = ema
        self.groups: list[tuple[float, float, int]] = []
        self.skipped = 0
        self._params = [p for p in model.parameters() if p.requires_grad]
        if not self._params:
            raise SpecError("the model has no parameter that requires grad")
        self._handles = [p.register_hook(self._hook(i)) for i, p in enumerate(self._params)]
        self._sum: list[Any] = [None] * len(self._params)
        self._current: dict[int, Any] = {}
        self._active = False
        self._scale = 1.0
        self._squares: list[float] = []
        self._ema_g2 = self._ema_tr = 0.0
        self._updates = 0

    def _hook(self, index: int) -> Callable[[Any], None]:
        def hook(grad: Any) -> None:
            if not self._active:
                return
            g = grad.detach().float() / self._scale  # fp32, the AMP loss scale removed
            held = self._current.get(index)
            self._current[index] = g if held is None else held.add_(g)

        return hook

    @contextlib.contextmanager
    def micro_batch(self, scale: float = 1.0) -> Iterator[None]:
        """Count the gradients of the backward passes inside as one micro-batch (``scale``:
        the loss scale they were multiplied by)."""
        self._active, self._scale = True, float(scale)
        self._current = {}
        try:
            yield
        finally:
            self._active = False
        # |g_i|^2 over the whole micro-batch gradient (its backward passes summed)
        square = sum(float(g.pow(2).sum()) for g in self._current.values())
        if not math.isfinite(square):  # an overflowed step (AMP): drop the micro-batch
            self.skipped += 1
        else:
            self._squares.append(square)
            for index, g in self._current.items():
                total = self._sum[index]
                self._sum[index] = g if total is None else total.add_(g)
        self._current = {}

    def end_group(self) -> float | None:
        """Close a group of micro-batches at fixed parameters; the smoothed ``B_simple``
        (None until a group of at least 2 finite micro-batches was seen)."""
        k = len(self._squares)
        if k >= 2:
            a = sum(self._squares) / k
            c = sum(float(s.pow(2).sum()) for s in self._sum if s is not None) / k**2
            self.groups.append((a, c, k))
            g2 = (k * c - a) / (k - 1)
            tr = self.micro_batch_size * k * (a - c) / (k - 1)
            self._ema_g2 = self.ema * self._ema_g2 + (1 - self.ema) * g2
            self._ema_tr = self.ema * self._ema_tr + (1 - self.ema) * tr
            self._updates += 1
        self._squares, self._sum = [], [None] * len(self._params)
        return self.b_simple

    @property
    def b_simple(self) -> float | None:
        """EMA(tr(Sigma)) / EMA(|G|^2) (the EMAs' bias cancels in the ratio); None before the
        first group, ``inf`` while ``|G|^2`` is not measurably positive."""
        if not self._updates:
            return None
        if self._ema_g2 <= 0:
            return math.inf
        return max(self._ema_tr, 0.0) / self._ema_g2

    def result(self, *, seconds: float = 0.0, note: str = _EARLY_NOTE) -> NoiseScale:
        """Every group so far as a :class:`NoiseScale` with its interval."""
        if not self.groups:
            raise SpecError("no group of at least 2 finite micro-batches was measured")
        found = noise_scale_from_groups(
            self.groups,
            micro_batch=self.micro_batch_size,
            micro_batches=max(k for _, _, k in self.groups),
        )
        return NoiseScale(
            **{**asdict(found), "skipped": self.skipped, "seconds": seconds, "note": note}
        )

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def measure_noise_scale(
    model: Any,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Any],
    *,
    micro_batch: int,
    micro_batches: int = 4,
    groups: int = 8,
    time_budget_s: float | None = 10.0,
    autocast: Any = None,
    note: str | None = None,
) -> NoiseScale:
    """Measure the noise scale of ``model`` on real ``batches`` (of ``micro_batch`` samples).

    Each group takes ``micro_batches`` batches at the same parameters (no optimizer step);
    ``groups`` groups (fewer if ``time_budget_s`` runs out after at least 3, or the data
    does) give the estimate and its interval. The model's parameters and gradients are left
    as they were. ``loss_fn(model, batch)`` returns the mean loss of a batch.
    """
    started = time.perf_counter()
    saved_grads = [p.grad for p in model.parameters()]
    was_training = model.training
    model.train()
    noise = GradientNoise(model, micro_batch=micro_batch)
    it = iter(batches)
    context = autocast if autocast is not None else contextlib.nullcontext()
    try:
        while len(noise.groups) < groups:
            chunk = list(itertools.islice(it, micro_batches))
            if len(chunk) < micro_batches:
                break  # the data ran out
            for batch in chunk:
                with noise.micro_batch():
                    with context:
                        loss = loss_fn(model, batch)
                    loss.backward()
                model.zero_grad(set_to_none=True)
            noise.end_group()
            elapsed = time.perf_counter() - started
            if time_budget_s is not None and len(noise.groups) >= 3 and elapsed > time_budget_s:
                break
        if len(noise.groups) < 2:
            raise SpecError(
                f"the data gave {len(noise.groups)} full group(s) of {micro_batches} "
                f"batches of {micro_batch}: the noise scale needs at least 2 "
                f"(about {2 * micro_batches * micro_batch} samples)"
            )
        return noise.result(seconds=time.perf_counter() - started, note=note or _EARLY_NOTE)
    finally:
        noise.close()
        for p, g in zip(model.parameters(), saved_grads, strict=True):
            p.grad = g
        model.train(was_training)
