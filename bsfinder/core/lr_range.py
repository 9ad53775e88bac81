"""The learning-rate range test's arithmetic (Smith 2017, "Cyclical Learning Rates for
Training Neural Networks", section 3.3): the sweep, the smoothed loss, where it diverged,
and the suggestion. Pure: no torch; :mod:`bsfinder.lr` runs the steps.

A range test trains from a very small learning rate, multiplying it by a constant factor
each step, and records the loss. The loss first stays flat (the LR is too small to move
it), then falls, then climbs and diverges (the LR is too large). The suggestion is taken
from the falling part; which point of it is a rule:

- ``"minimum/3"`` (the default): a third of the LR where the loss is lowest, the loss read
  through a running median over +-:data:`MEDIAN_HALF_WIDTH` steps. The median is centred,
  so it does not lag: the EMA (beta 0.98) trails the raw loss by up to ~50 steps, half a
  sweep, and its minimum sits where the raw loss already climbs. For a quadratic, the
  loss stops falling at the divergence 2/L and the best constant step is 1/L; a third
  leaves room for the divergence of a long run arriving below the sweep's (momentum
  carries a short sweep past it). It is never above :data:`STEEPEST_BOUND` x the steepest
  descent of the smoothed loss: on a noise-free quadratic (full-batch linear regression)
  the loss fell 2000x and was lowest at 5.6x the divergence 2/L, since the sharpest
  direction, converged already, takes many steps to blow up; the bound puts it at 0.37x
  2/L (tested), and on the digits it binds on 4 curves of 32.
- ``"steepest"``: where the smoothed loss falls fastest per decade of LR (Lightning's
  ``lr_find`` suggestion: the most negative gradient of the loss over log LR), capped at
  a third of the LR at the smoothed minimum.
- ``"valley"``: fastai's ``valley``: the longest run of decreasing losses, and a point
  ~half-way down it (index ``start + 1/3 + 1/6`` of its length).
- ``"minimum/10"``: a tenth of the LR at the smoothed loss's minimum (fastai's
  ``minimum``; Smith's "one order of magnitude below the divergence").

The default, :data:`DEFAULT_RULE`, was chosen on the digits (``benchmarks/validate_lr.py
--rules`` and docs/learning-rate.md): SGD and AdamW, with and without BatchNorm, at
batches 16, 32, 64 and 128, two sweeps each (32 curves), the steps to the target accuracy
at each rule's suggestion over the best of the 6-LR grid at that batch (median of 3
seeds): ``minimum/3`` median 1.06x, 5 of 32 above 1.2x, one divergence (SGD at batch 16,
where the sweep's loss was lowest at 0.74 and training diverges from 0.1); ``steepest``
(capped) 1.21x, 16 above 1.2x, 3 divergences (SGD: it sat at the cap, 0.2-0.3);
``minimum/10`` 1.25x, 16 above; ``valley`` 2.6x (its longest descent starts in the flat
part, where the bias-corrected EMA still creeps down).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_RULE",
    "RULES",
    "LRCurve",
    "LRSuggestion",
    "diverged",
    "running_median",
    "smooth",
    "suggest",
    "sweep",
]

RULES = ("minimum/3", "steepest", "valley", "minimum/10")
DEFAULT_RULE = "minimum/3"
#: EMA weight of the smoothed loss (fastai's and Lightning's 0.98)
BETA = 0.98
#: the sweep stops once the smoothed loss is this many times its best (both frameworks: 4)
DIVERGE_FACTOR = 4.0
#: a clear descent: the smoothed loss's minimum is at least this fraction below its start
MIN_DROP = 0.10
#: ...reached after at least this many steps (fewer: the sweep was too coarse to read)
MIN_STEPS = 12
#: the first steps the smoothed loss is still mostly its first value: not read for slopes
SKIP_BEGIN = 0.1
#: ``"steepest"`` never above this fraction of the LR at the smoothed minimum
STEEPEST_CAP = 1 / 3
#: ``"minimum/3"``: the running median's half-width, in steps (13 steps: about a decade of
#: LR in the default 100-step sweep over 8 decades)
MEDIAN_HALF_WIDTH = 6
#: ``"minimum/3"`` never above this many times the steepest descent of the smoothed loss
STEEPEST_BOUND = 3.0


def sweep(start: float, end: float, steps: int) -> tuple[float, ...]:
    """``steps`` learning rates from ``start`` to ``end``, each a constant factor above the
    one before (an exponential sweep)."""
    if not (0 < start < end) or not math.isfinite(end):
        raise ValueError(f"a sweep needs 0 < start < end, got {start!r} and {end!r}")
    if steps < 2:
        raise ValueError(f"a sweep needs at least 2 steps, got {steps!r}")
    ratio = (end / start) ** (1 / (steps - 1))
    return tuple(start * ratio**i for i in range(steps))


def smooth(losses: Sequence[float], beta: float = BETA) -> tuple[float, ...]:
    """The exponential moving average of ``losses`` with bias correction (Adam's): step
    ``i`` is ``avg_i / (1 - beta**(i+1))``, so that early values are not pulled to 0. A
    non-finite loss makes the rest non-finite."""
    out: list[float] = []
    avg = 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return tuple(out)


def running_median(values: Sequence[float], half_width: int) -> tuple[float, ...]:
    """The median of ``values[i - half_width : i + half_width + 1]`` at each ``i`` (the
    window cut at the ends; a non-finite value counts as larger than any finite one)."""
    out = []
    for i in range(len(values)):
        window = sorted(
            (v if math.isfinite(v) else math.inf)
            for v in values[max(0, i - half_width) : i + half_width + 1]
        )
        out.append(window[len(window) // 2])
    return tuple(out)


def diverged(smoothed: Sequence[float], factor: float = DIVERGE_FACTOR) -> bool:
    """The sweep should stop: the last smoothed loss is not finite, or ``factor`` times the
    best so far."""
    if not smoothed:
        return False
    last = smoothed[-1]
    if not math.isfinite(last):
        return True
    best = min(smoothed)
    return best > 0 and last > factor * best


@dataclass(frozen=True)
class LRSuggestion:
    """A rule's learning rate from a curve, or None with the reason there is none.

    Attributes:
        lr: the suggestion (None: the curve shows no clear descent).
        rule: the rule that made it (a key of :data:`RULES`).
        index: the step of the curve it was read at (for ``"minimum/3"`` and
            ``"minimum/10"``: the minimum's; for a capped ``"steepest"``: the step nearest
            the cap).
        reason: how it was read, or why there is no suggestion, in words.
        by_rule: every rule's suggestion on the same curve (for comparison).
    """

    lr: float | None
    rule: str
    index: int | None
    reason: str
    by_rule: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "rule": self.rule,
            "index": self.index,
            "reason": self.reason,
            "by_rule": dict(self.by_rule),
        }


@dataclass(frozen=True)
class LRCurve:
    """A range test's record: the LR and loss of every step run, smoothed.

    Attributes:
        lrs: the learning rate of each step. losses: each step's training loss.
        smoothed: :func:`smooth` of ``losses``.
        stopped: ``"diverged"`` (the smoothed loss passed :data:`DIVERGE_FACTOR` x its best,
            or was not finite), ``"end"`` (the sweep's last LR), ``"time-limit"`` or
            ``"data"`` (the loader ran out).
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed: tuple[float, ...]
    stopped: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "lrs": list(self.lrs),
            "losses": [_json_float(v) for v in self.losses],
            "smoothed": [_json_float(v) for v in self.smoothed],
            "stopped": self.stopped,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LRCurve:
        def floats(key: str) -> tuple[float, ...]:
            return tuple(math.nan if v is None else float(v) for v in data.get(key, ()))

        return cls(floats("lrs"), floats("losses"), floats("smoothed"), str(data["stopped"]))


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


def suggest(curve: LRCurve, rule: str = DEFAULT_RULE) -> LRSuggestion:
    """The learning rate ``rule`` reads from ``curve``; never above the LR at the smoothed
    loss's minimum (so never at or past the divergence). None, with the reason, when the
    curve has no clear descent: fewer than :data:`MIN_STEPS` steps before its minimum, or a
    minimum less than :data:`MIN_DROP` below the start."""
    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: use one of {', '.join(RULES)}")
    by_rule = {name: _read(curve, name)[0] for name in RULES}
    lr, index, reason = _read(curve, rule)
    return LRSuggestion(lr=lr, rule=rule, index=index, reason=reason, by_rule=by_rule)


def _read(curve: LRCurve, rule: str) -> tuple[float | None, int | None, str]:
    finite = [i for i, v in enumerate(curve.smoothed) if math.isfinite(v)]
    if not finite:
        return None, None, "no finite loss: the first step already diverged"
    low = min(finite, key=lambda i: curve.smoothed[i])
    start = curve.smoothed[0]
    drop = (start - curve.smoothed[low]) / abs(start) if start else 0.0
    if low < MIN_STEPS:
        return (
            None,
            None,
            (
                f"no clear descent: the smoothed loss was lowest at step {low + 1} of "
                f"{len(curve.lrs)} (lr {curve.lrs[low]:.3g}); start the sweep lower or run more "
                "steps"
            ),
        )
    if drop < MIN_DROP:
        return (
            None,
            None,
            (
                f"no clear descent: the smoothed loss fell {drop:.0%} over the sweep (from "
                f"{start:.4g} to {curve.smoothed[low]:.4g}); the loss may be flat on this data, "
                "or the sweep too short"
            ),
        )
    if rule == "minimum/3":
        median = running_median(curve.losses[: len(curve.smoothed)], MEDIAN_HALF_WIDTH)
        # no further than the smoothed minimum: past it the EMA says the loss has turned
        at = min(range(low + 1), key=lambda i: (median[i], i))
        steepest = curve.lrs[_steepest(curve, max(1, int(SKIP_BEGIN * len(curve.lrs))), low)]
        window = 2 * MEDIAN_HALF_WIDTH + 1
        if curve.lrs[at] / 3 > STEEPEST_BOUND * steepest:
            return (
                STEEPEST_BOUND * steepest,
                at,
                (
                    f"{STEEPEST_BOUND:g}x the steepest descent (lr {steepest:.3g}): a third of "
                    f"lr {curve.lrs[at]:.3g}, where the loss (running median over {window} "
                    "steps) was lowest, is above it; a loss still falling that far past its "
                    "steepest point may be past the divergence"
                ),
            )
        return (
            curve.lrs[at] / 3,
            at,
            (
                f"a third of lr {curve.lrs[at]:.3g}, where the loss (running median over "
                f"{window} steps) was lowest"
            ),
        )
    if rule == "minimum/10":
        return (
            curve.lrs[low] / 10,
            low,
            (
                f"a tenth of lr {curve.lrs[low]:.3g}, where the smoothed loss was lowest "
                f"({curve.smoothed[low]:.4g}, {drop:.0%} below its start)"
            ),
        )
    if rule == "steepest":
        first = max(1, int(SKIP_BEGIN * len(curve.lrs)))
        index = _steepest(curve, first, low)
        cap = STEEPEST_CAP * curve.lrs[low]
        if curve.lrs[index] > cap:
            near = min(range(low + 1), key=lambda i: abs(math.log(curve.lrs[i] / cap)))
            return (
                cap,
                near,
                (
                    f"a third of lr {curve.lrs[low]:.3g}, where the smoothed loss was lowest: the "
                    f"steepest descent (lr {curve.lrs[index]:.3g}, step {index + 1}) was above it"
                ),
            )
        return (
            curve.lrs[index],
            index,
            (
                f"the steepest descent of the smoothed loss per decade of lr, at step {index + 1} "
                f"(lowest at lr {curve.lrs[low]:.3g})"
            ),
        )
    index = _valley(curve.smoothed[: low + 1])
    return (
        curve.lrs[index],
        index,
        (
            f"half-way down the longest descent of the smoothed loss, step {index + 1} (lowest "
            f"at lr {curve.lrs[low]:.3g})"
        ),
    )


def _steepest(curve: LRCurve, first: int, last: int) -> int:
    """The step in ``[first, last]`` where the smoothed loss falls most per unit of log LR
    (central differences; one-sided at the ends)."""
    logs = [math.log10(lr) for lr in curve.lrs]
    values = curve.smoothed
    best, best_slope = last, math.inf
    for i in range(first, last + 1):
        lo, hi = max(0, i - 1), min(len(values) - 1, i + 1)
        if hi == lo or not (math.isfinite(values[lo]) and math.isfinite(values[hi])):
            continue
        slope = (values[hi] - values[lo]) / (logs[hi] - logs[lo])
        if slope < best_slope:
            best, best_slope = i, slope
    return best


def _valley(values: Sequence[float]) -> int:
    """fastai's ``valley``: the longest decreasing subsequence's span (its first and last
    steps), and the step 1/3 + 1/6 of the way along it."""
    n = len(values)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if values[i] < values[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
        if lds[max_end] < lds[i]:
            max_end = i
            max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return max(0, min(n - 1, max_start + int(sections) + int(sections / 2)))
