"""The batch-size search, written once, as a pure function over ``measure(batch)``.

Phases, each recorded in the trace:

* ``grow``: start, 2x start, 4x start, ... until a batch fails or ``max_batch`` is reached;
* ``predict``: fit ``peak(b) = a + k*b`` to the largest fitting trials and try the batch the
  line says is the last that fits (rounded down to the granularity);
* ``confirm``: try one step of granularity past a prediction (above it if it fitted, below if
  it failed), which ends the search when the line was right;
* ``bisect``: halve the interval between the last fit and the first failure when there is no
  line, or after two predictions that did not close the interval;
* ``safe``: try the largest batch the line puts under ``(1 - headroom) * capacity``.

No torch here: ``measure`` is given by the caller (a real worker, an in-process runner or a
fake), and tests pin the exact list of batches tried.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from bsfinder.core.fit import fit_memory_line
from bsfinder.options import Granularity, RecommendOptions, SearchOptions, check_option

__all__ = [
    "Granularity",
    "Measured",
    "Outcome",
    "SearchResult",
    "SearchStep",
    "measured",
    "search",
]

Phase = Literal["grow", "shrink", "predict", "confirm", "bisect", "safe"]
_MAX_PREDICTIONS = 2


class Outcome(Protocol):
    """What the search needs to know of one trial."""

    @property
    def batch_size(self) -> int: ...

    @property
    def fits(self) -> bool: ...

    @property
    def peak_bytes(self) -> int | None: ...


@dataclass(frozen=True)
class SearchStep:
    """One batch tried, why, and whether it fitted."""

    batch_size: int
    phase: Phase
    fits: bool


@dataclass(frozen=True)
class SearchResult:
    """The trace of a search and what it established.

    Attributes:
        steps: every batch tried, in order.
        max_batch: largest batch that fitted, at the granularity (None: nothing fits).
        first_failure: smallest batch that failed above ``max_batch`` (None: none failed,
            e.g. the search stopped at ``max_batch_limit``).
        max_pow2_batch: largest power of two that fitted.
        safe_batch: largest fitting batch whose peak stayed within the headroom.
        stop_reason: ``"converged"``, ``"max-batch"`` or ``"nothing-fits"``.
    """

    steps: tuple[SearchStep, ...]
    max_batch: int | None
    first_failure: int | None
    max_pow2_batch: int | None
    safe_batch: int | None
    stop_reason: str

    @property
    def tried(self) -> list[int]:
        """The batches tried, in order."""
        return [s.batch_size for s in self.steps]


class Measured(NamedTuple):
    """What trials establish without another one (see :func:`measured`)."""

    max_batch: int | None
    max_pow2_batch: int | None
    safe_batch: int | None


def measured(
    outcomes: Iterable[Outcome],
    *,
    below: int | None,
    capacity_bytes: int | None,
    headroom: float,
) -> Measured:
    """The largest fitting batch under ``below`` (a failure; None: no bound), the largest such
    power of two, and the largest fitting batch whose peak is within ``(1 - headroom) *
    capacity_bytes`` (None without a capacity).

    The search's own answers where no trial is left to try, and a probe's when it is
    interrupted before the search ends.
    """
    done = list(outcomes)
    fitting = [o.batch_size for o in done if o.fits and (below is None or o.batch_size < below)]
    safe = None
    if capacity_bytes is not None:
        target = (1 - headroom) * capacity_bytes
        safe = max((o.batch_size for o in done if _within(o, target)), default=None)
    return Measured(
        max_batch=max(fitting, default=None),
        max_pow2_batch=max((b for b in fitting if b & (b - 1) == 0), default=None),
        safe_batch=safe,
    )


def _within(outcome: Outcome, target: float) -> bool:
    """The outcome fitted with a peak of at most ``target`` bytes."""
    return outcome.fits and outcome.peak_bytes is not None and outcome.peak_bytes <= target


def search(
    measure: Callable[[int], Outcome],
    *,
    capacity_bytes: int | None,
    start: int = SearchOptions.start_batch,
    max_batch: int | None = SearchOptions.max_batch,
    granularity: Granularity = SearchOptions.granularity,
    memory_model: bool = SearchOptions.memory_model,
    headroom: float = RecommendOptions.headroom,
) -> SearchResult:
    """Find the largest batch for which ``measure(batch).fits``.

    Args:
        measure: runs one trial at a batch size and reports whether it fitted and its peak.
        capacity_bytes: the memory the peak is compared against; enables the memory line
            and the safe batch. None disables both.
        start: first batch to try (a power of two is best).
        max_batch: never try a batch above this.
        granularity: answer to a multiple of this (``1`` for exact) or ``"pow2"`` to stop
            after the powers of two.
        memory_model: jump with the fitted line instead of plain bisection.
        headroom: fraction of capacity the safe batch leaves free.

    Returns:
        The trace and what it established. Each batch in it was measured, none is inferred.

    Example:
        >>> from bsfinder import FakeRunner
        >>> dev = FakeRunner(capacity_bytes=100, per_sample_bytes=1)
        >>> search(dev.run_trial, capacity_bytes=100, granularity=1).max_batch
        100
    """
    # the options' own checks, in their words (a SpecError is a ValueError)
    start = check_option(SearchOptions, "start_batch", start, called="start")
    max_batch = check_option(SearchOptions, "max_batch", max_batch)
    granularity = check_option(SearchOptions, "granularity", granularity)
    headroom = check_option(RecommendOptions, "headroom", headroom)

    steps: list[SearchStep] = []
    outcomes: dict[int, Outcome] = {}

    def run(batch: int, phase: Phase) -> bool:
        outcome = measure(batch)
        outcomes[batch] = outcome
        steps.append(SearchStep(batch, phase, outcome.fits))
        return outcome.fits

    def line() -> tuple[float, float] | None:
        if not memory_model or capacity_bytes is None:
            return None
        points = [
            (b, o.peak_bytes) for b, o in outcomes.items() if o.fits and o.peak_bytes is not None
        ]
        return fit_memory_line(points)

    if max_batch is not None:
        start = min(start, max_batch)
    if granularity == "pow2":  # every batch tried is a power of two, bounds included
        start = 1 << (start.bit_length() - 1)
        if max_batch is not None:
            max_batch = 1 << (max_batch.bit_length() - 1)
    lo, hi = _grow(run, start, max_batch)
    stop_reason = "converged"
    if lo is None:
        stop_reason = "nothing-fits"
    elif hi is None:
        stop_reason = "max-batch"
    elif granularity != "pow2":
        lo, hi = _narrow(run, line, lo, hi, granularity, capacity_bytes)

    safe = None
    if lo is not None:
        safe = _safe(run, line, outcomes, lo, granularity, capacity_bytes, headroom)
    found = measured(outcomes.values(), below=None, capacity_bytes=None, headroom=headroom)
    return SearchResult(
        steps=tuple(steps),
        max_batch=lo,
        first_failure=hi,
        max_pow2_batch=found.max_pow2_batch,
        safe_batch=safe,
        stop_reason=stop_reason,
    )


def _grow(
    run: Callable[[int, Phase], bool], start: int, max_batch: int | None
) -> tuple[int | None, int | None]:
    """Double from ``start`` until a failure; halve from ``start`` if ``start`` fails."""
    batch = start
    if not run(batch, "grow"):
        hi = batch
        while batch > 1:
            batch //= 2
            if run(batch, "shrink"):
                return batch, hi
            hi = batch
        return None, hi
    while True:
        if max_batch is not None and batch >= max_batch:
            return batch, None
        nxt = batch * 2 if max_batch is None else min(batch * 2, max_batch)
        if not run(nxt, "grow"):
            return batch, nxt
        batch = nxt


def _grid_between(lo: int, hi: int, g: int) -> tuple[int, int] | None:
    """Smallest and largest multiples of ``g`` strictly between ``lo`` and ``hi``."""
    first = (lo // g + 1) * g
    last = ((hi - 1) // g) * g
    return (first, last) if first <= last else None


def _narrow(
    run: Callable[[int, Phase], bool],
    line: Callable[[], tuple[float, float] | None],
    lo: int,
    hi: int,
    g: int,
    capacity: int | None,
) -> tuple[int, int]:
    """Shrink ``(lo, hi)`` to adjacent grid points: predict + confirm, else bisect.

    The line is trusted only where it says something new: a line that predicts outside
    ``(lo, hi)`` contradicts a trial, and a line that already missed (no new fitting point
    since) would only miss next door again; bisection halves the interval instead.
    """
    predictions = 0
    missed: tuple[float, float] | None = None
    while (grid := _grid_between(lo, hi, g)) is not None:
        first, last = grid
        fitted = line() if predictions < _MAX_PREDICTIONS else None
        guess = None
        if fitted is not None and capacity is not None and fitted != missed:
            a, k = fitted
            raw = int((capacity - a) / k) // g * g
            guess = raw if first <= raw <= last else None
        if guess is not None:
            predictions += 1
            if run(guess, "predict"):
                lo = guess
                if guess + g < hi:
                    if run(guess + g, "confirm"):
                        lo = guess + g
                    else:
                        hi = guess + g
            else:
                hi = guess
                missed = fitted
                if guess - g > lo:
                    if run(guess - g, "confirm"):
                        lo = guess - g
                    else:
                        hi = guess - g
            continue
        mid = (lo + hi) // 2 // g * g
        mid = min(max(mid, first), last)
        if run(mid, "bisect"):
            lo = mid
        else:
            hi = mid
    return lo, hi


def _safe(
    run: Callable[[int, Phase], bool],
    line: Callable[[], tuple[float, float] | None],
    outcomes: dict[int, Outcome],
    max_fit: int,
    granularity: Granularity,
    capacity: int | None,
    headroom: float,
) -> int | None:
    """Largest fitting batch with peak <= (1 - headroom) * capacity, trying one if needed."""
    if capacity is None:
        return None
    target = (1 - headroom) * capacity
    best = measured(
        outcomes.values(), below=None, capacity_bytes=capacity, headroom=headroom
    ).safe_batch
    fitted = line()
    if fitted is None:
        return best
    a, k = fitted
    step = 1 if granularity == "pow2" else granularity
    guess = int((target - a) / k) // step * step
    if granularity == "pow2" and guess >= 1:
        guess = 1 << (guess.bit_length() - 1)
    if guess < 1 or guess > max_fit or guess in outcomes or (best is not None and guess <= best):
        return best
    run(guess, "safe")
    return guess if _within(outcomes[guess], target) else best
