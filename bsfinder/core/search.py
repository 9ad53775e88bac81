"""The batch-size search, written once, as a pure function over ``measure(batch)``.

Phases, each recorded in the trace:

* ``grow``: start, 4x start, 16x start, ... (doubling at granularity pow2) until a batch
  fails or ``max_batch`` is reached; these trials are timed until throughput stops rising
  (:func:`plateaued`), then only checked for fit;
* ``jump``: as soon as the memory line through the three largest fits is trusted (its two
  segments agree), straight to the batch it puts at the edge, instead of growing through
  sizes that cost more each time (then ``confirm``);
* ``extend``: steps of g, 2g, 4g... up from the largest fit, after a jump that fitted with
  no line to follow, or when the line puts the edge at or below a batch that fitted;
* ``predict``: fit ``peak(b) = a + k*b`` to the largest fitting trials and try the batch the
  line says is the last that fits (rounded down to the granularity);
* ``confirm``: try one step of granularity past a prediction (above it if it fitted, below if
  it failed), which ends the search when the line was right;
* ``bisect``: halve the interval between the last fit and the first failure when there is no
  line, or after two predictions that did not close the interval;
* ``safe``: try the largest batch the line puts under ``(1 - headroom) * capacity``, unless
  the line's first prediction was the edge (then that batch is the line's, not tried);
* ``affordable``: with a time limit, the largest batch whose trial fits in the time left,
  once the next planned trial would not (then the search stops: ``time-limit``).

Only ``measure`` trials are timed (warm-up + the timed steps); ``check_fit`` trials run the
steps to the steady-state peak and say whether they fit (a runner may time their last step
as one reading: throughput near the edge at no extra cost).

No torch here: ``measure`` is given by the caller (a real worker, an in-process runner or a
fake), and tests pin the exact list of batches tried.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

from bsfinder.core.fit import fit_memory_line
from bsfinder.options import Granularity, RecommendOptions, SearchOptions, check_option

__all__ = [
    "Granularity",
    "Measured",
    "Outcome",
    "SearchResult",
    "SearchStep",
    "measured",
    "plateaued",
    "search",
    "trial_cost_s",
]

Phase = Literal[
    "grow", "shrink", "jump", "extend", "predict", "confirm", "bisect", "safe", "affordable"
]
_MAX_PREDICTIONS = 2
#: a doubling that gains less samples/s than this is flat (the time-optimal tolerance)
THROUGHPUT_TOLERANCE = 0.05
#: the line is trusted to jump when its two last segments' slopes differ by at most this...
_SLOPE_AGREEMENT = 0.25
#: ...and the peak rose across them by at least this fraction of the capacity
_VISIBLE_RISE = 0.02
#: a trial predicted to take the time left is started only if it is this much under it
_TIME_SAFETY = 1.5
#: the affordable trial is run only if it is at least this many times the largest fit
_WORTH_IT = 1.25
#: a safe batch measured within this fraction below the line's is not worth another trial
_SAFE_SLACK = 0.03
#: a line whose first prediction of the edge was within this fraction (or one granule) of
#: the edge found puts the safe batch's peak, far nearer the line's points, without a trial
_LINE_RIGHT = 0.01
#: the jump goes at most this many times the largest fit's batch
_JUMP_REACH = 8
#: the growth factor while no trial failed (doubling at granularity pow2): a trial costs
#: about its batch in steps, so growing 4x runs a third of the sizes doubling does, and an
#: overshoot fails in its first step
GROWTH = 4
#: the grid's end when no failure and no max_batch bound it
_NO_LIMIT = 2**62


class Outcome(Protocol):
    """What the search needs to know of one trial."""

    @property
    def batch_size(self) -> int: ...

    @property
    def fits(self) -> bool: ...

    @property
    def peak_bytes(self) -> int | None: ...

    # optional (read with getattr): ``samples_per_s``, ``wall_s`` and ``steps_run``, for the
    # throughput plateau and the time limit; an outcome without them never stops a search


@dataclass(frozen=True)
class SearchStep:
    """One batch tried, why, and whether it fitted."""

    batch_size: int
    phase: Phase
    fits: bool
    timed: bool = True


@dataclass(frozen=True)
class SearchResult:
    """The trace of a search and what it established.

    Attributes:
        steps: every batch tried, in order.
        max_batch: largest batch that fitted, at the granularity (None: nothing fits).
        first_failure: smallest batch that failed above ``max_batch`` (None: none failed,
            e.g. the search stopped at ``max_batch_limit``).
        max_pow2_batch: largest power of two that fitted, or (after a jump past the
            powers of two) the largest power of two below ``max_batch``.
        safe_batch: largest fitting batch whose peak stayed within the headroom.
        stop_reason: ``"converged"``, ``"max-batch"``, ``"nothing-fits"`` or
            ``"time-limit"`` (the next trial would have overrun it: ``max_batch`` is what
            the trials so far establish).
        edge_estimate: at a time limit, the largest batch the memory line puts within the
            capacity (not tried; None: no line).
        next_batch: at a time limit, the trial that was not started, and
        next_trial_s: its predicted seconds.
        safe_from_line: ``safe_batch`` was not run: the memory line, whose first prediction
            of the edge was right, puts its peak at ``safe_peak_estimate`` bytes.
    """

    steps: tuple[SearchStep, ...]
    max_batch: int | None
    first_failure: int | None
    max_pow2_batch: int | None
    safe_batch: int | None
    stop_reason: str
    edge_estimate: int | None = None
    next_batch: int | None = None
    next_trial_s: float | None = None
    safe_from_line: bool = False
    safe_peak_estimate: int | None = None

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
    check_fit: Callable[[int], Outcome] | None = None,
    time_limit_s: float | None = None,
    steps: tuple[int, int] = (4, 2),
    tolerance: float = THROUGHPUT_TOLERANCE,
) -> SearchResult:
    """Find the largest batch for which ``measure(batch).fits``.

    Args:
        measure: runs one timed trial at a batch size and reports whether it fitted, its
            peak and (optionally) its step times and wall time.
        capacity_bytes: the memory the peak is compared against; enables the memory line
            and the safe batch. None disables both.
        start: first batch to try (a power of two is best).
        max_batch: never try a batch above this.
        granularity: answer to a multiple of this (``1`` for exact) or ``"pow2"`` to stop
            after the powers of two.
        memory_model: jump with the fitted line instead of plain doubling and bisection.
        headroom: fraction of capacity the safe batch leaves free.
        check_fit: runs an untimed trial that only says whether a batch fits (the steps to
            the steady-state peak); None: every trial is ``measure``'s.
        time_limit_s: seconds of trials (their ``wall_s``) the search may spend; a trial
            predicted to overrun it is not started (see :func:`trial_cost_s`).
        steps: the steps of a timed and of an untimed trial, for the cost prediction.
        tolerance: the throughput gain under which a doubling counts as flat.

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
    if max_batch is not None:
        start = min(start, max_batch)
    if granularity == "pow2":  # every batch tried is a power of two, bounds included
        start = 1 << (start.bit_length() - 1)
        if max_batch is not None:
            max_batch = 1 << (max_batch.bit_length() - 1)
    state = _Search(
        measure=measure,
        check_fit=check_fit or measure,
        capacity=capacity_bytes if memory_model else None,
        safe_capacity=capacity_bytes,
        max_batch=max_batch,
        granularity=granularity,
        headroom=headroom,
        time_limit_s=time_limit_s,
        steps=steps,
        tolerance=tolerance,
    )
    lo, hi = None, None
    stop_reason = "converged"
    try:
        lo, hi = state.grow(start)
        if lo is None:
            stop_reason = "nothing-fits"
        elif granularity != "pow2" and (hi is None or _grid_between(lo, hi, granularity)):
            lo, hi = state.narrow(lo, hi)
        if lo is not None and hi is None:
            stop_reason = "max-batch"
    except _OutOfTime as stop:
        lo, hi = state.bounds()
        stop_reason = "time-limit"
        state.pending = (stop.batch, stop.cost_s)
    safe = None
    if lo is not None and stop_reason != "time-limit":
        try:
            safe = state.safe(lo)
        except _OutOfTime:
            safe = None
    if safe is None and capacity_bytes is not None:
        safe = measured(
            state.outcomes.values(), below=hi, capacity_bytes=capacity_bytes, headroom=headroom
        ).safe_batch
    found = measured(state.outcomes.values(), below=hi, capacity_bytes=None, headroom=headroom)
    max_pow2 = found.max_pow2_batch
    if lo is not None and granularity != "pow2":
        # a jump skips the larger powers of two; the one below the largest fit fits as
        # every batch below it does (memory grows with the batch: bisection relies on it too)
        max_pow2 = max(max_pow2 or 0, 1 << (lo.bit_length() - 1))
    edge = state.edge() if stop_reason == "time-limit" else None
    return SearchResult(
        steps=tuple(state.steps_done),
        max_batch=lo,
        first_failure=hi,
        max_pow2_batch=max_pow2,
        safe_batch=safe,
        stop_reason=stop_reason,
        edge_estimate=edge,
        next_batch=state.pending[0] if state.pending else None,
        next_trial_s=state.pending[1] if state.pending else None,
        safe_from_line=state.safe_from_line and safe is not None,
        safe_peak_estimate=state.peak_on_line(safe) if state.safe_from_line and safe else None,
    )


def _down(batch: float, g: int) -> int:
    """``batch`` rounded down to a multiple of ``g``, forgiving the fit's last bits (a line
    through exact points may put 9,400 at 9,399.999...)."""
    return int(batch + 1e-6) // g * g


def _grid_between(lo: int, hi: int, g: int) -> tuple[int, int] | None:
    """Smallest and largest multiples of ``g`` strictly between ``lo`` and ``hi``."""
    first = (lo // g + 1) * g
    last = ((hi - 1) // g) * g
    return (first, last) if first <= last else None


class _OutOfTime(Exception):
    """The next trial would overrun the time limit: its batch and predicted seconds."""

    def __init__(self, batch: int, cost_s: float) -> None:
        super().__init__(batch, cost_s)
        self.batch = batch
        self.cost_s = cost_s


def _attr(outcome: Outcome, name: str) -> float | None:
    """An optional reading of an outcome (a memory estimate has no times)."""
    value = getattr(outcome, name, None)
    return float(value) if value is not None else None


def _steps_run(outcome: Outcome) -> int:
    value: Any = getattr(outcome, "steps_run", 0)
    return int(value or 0)


def plateaued(outcomes: Iterable[Outcome], tolerance: float = THROUGHPUT_TOLERANCE) -> bool:
    """Throughput stopped rising: the last timed trials, over at least a 4x range of batch
    (two doublings, or one step of 4x), each gained less than ``tolerance`` per doubling in
    samples/s over the best smaller batch (a step of 4x: ``(1 + tolerance)**2``, as two
    flat doublings would), so larger batches are not faster and their throughput is not
    worth timing (False with fewer than three timed, fitting trials)."""
    rates = sorted(
        (o.batch_size, rate)
        for o in outcomes
        if o.fits and (rate := _attr(o, "samples_per_s")) is not None
    )
    if len(rates) < 3:
        return False
    batches = [b for b, _ in rates]
    values = [rate for _, rate in rates]
    for i in range(len(values) - 1, 0, -1):
        doublings = math.log2(batches[i] / batches[i - 1])
        if values[i] >= (1 + tolerance) ** doublings * max(values[:i]):
            return False
        if batches[-1] >= 4 * batches[i - 1]:
            return True
    return False


def _cost_model(outcomes: Iterable[Outcome]) -> tuple[float, int, float] | None:
    """``(set-up s, reference batch, s per step at it)`` of :func:`trial_cost_s` (None
    before any trial with a wall time; no reference before a fitting one: batch 0)."""
    done = [o for o in outcomes if _attr(o, "wall_s") is not None]
    if not done:
        return None
    setup = min(_attr(o, "wall_s") or 0.0 for o in done)
    fitting = [o for o in done if o.fits and _steps_run(o)]
    if not fitting:
        return setup, 0, 0.0
    ref = max(fitting, key=lambda o: o.batch_size)
    per_step = max(0.0, (_attr(ref, "wall_s") or 0.0) - setup) / _steps_run(ref)
    return setup, ref.batch_size, per_step


def trial_cost_s(outcomes: Iterable[Outcome], batch: int, steps: int) -> float | None:
    """Predicted wall seconds of a trial of ``steps`` steps at ``batch``.

    The set-up (process, build, batch) is the fastest trial's wall time; a step costs the
    largest fitting trial's step (its wall time less that set-up, per step run), scaled
    linearly above its batch: never less than measured, and an overestimate where the
    device is not yet saturated. None before any trial with a wall time.
    """
    model = _cost_model(outcomes)
    if model is None:
        return None
    setup, ref, per_step = model
    return setup + steps * per_step * max(1.0, batch / ref) if ref else setup


def _affordable(outcomes: Iterable[Outcome], seconds: float, steps: int) -> int | None:
    """The largest batch whose trial :func:`trial_cost_s` puts within ``seconds``."""
    model = _cost_model(outcomes)
    if model is None:
        return None
    setup, ref, per_step = model
    if not ref or per_step <= 0 or seconds <= setup:
        return None
    return int(ref * (seconds - setup) / (steps * per_step))


@dataclass
class _Search:
    """The state of one search: what was tried, and the rules for what to try next."""

    measure: Callable[[int], Outcome]
    check_fit: Callable[[int], Outcome]
    capacity: int | None  # the memory line's (None: no line)
    safe_capacity: int | None
    max_batch: int | None
    granularity: Granularity
    headroom: float
    time_limit_s: float | None
    steps: tuple[int, int]
    tolerance: float
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    steps_done: list[SearchStep] = field(default_factory=list)
    pending: tuple[int, float] | None = None
    #: the batch the line first put at the edge (None: no prediction was made)
    first_prediction: int | None = None
    #: the safe batch is the line's (not run: see :meth:`safe`)
    safe_from_line: bool = False

    # -- trials -----------------------------------------------------------------------------
    def run(self, batch: int, phase: Phase, *, timed: bool = False) -> bool:
        """Run one trial (timed, or only to see whether it fits) within the time left."""
        self._within_time(batch, timed)
        outcome = (self.measure if timed else self.check_fit)(batch)
        self.outcomes[batch] = outcome
        self.steps_done.append(SearchStep(batch, phase, outcome.fits, timed))
        return outcome.fits

    def _spent(self) -> float:
        return sum(_attr(o, "wall_s") or 0.0 for o in self.outcomes.values())

    def _within_time(self, batch: int, timed: bool) -> None:
        """Raise :class:`_OutOfTime` when a trial at ``batch`` would overrun the limit; first
        run the largest trial that fits in the time left, when it says something new."""
        if self.time_limit_s is None:
            return
        steps = self.steps[0] if timed else self.steps[1]
        cost = trial_cost_s(self.outcomes.values(), batch, steps)
        left = self.time_limit_s - self._spent()
        if cost is None or cost <= left:
            return
        lo, hi = self.bounds()
        step = 1 if self.granularity == "pow2" else self.granularity
        reach = _affordable(self.outcomes.values(), left / _TIME_SAFETY, self.steps[1])
        if reach is not None and lo is not None:
            reach = min(reach, batch - 1, hi - 1 if hi is not None else reach)
            reach = reach // step * step
            if self.granularity == "pow2" and reach >= 1:
                reach = 1 << (reach.bit_length() - 1)
            if reach >= _WORTH_IT * lo and reach not in self.outcomes:
                outcome = self.check_fit(reach)
                self.outcomes[reach] = outcome
                self.steps_done.append(SearchStep(reach, "affordable", outcome.fits, False))
        raise _OutOfTime(batch, cost)

    def bounds(self) -> tuple[int | None, int | None]:
        """The largest fitting batch below the smallest failure, and that failure."""
        hi = min((b for b, o in self.outcomes.items() if not o.fits), default=None)
        lo = max(
            (b for b, o in self.outcomes.items() if o.fits and (hi is None or b < hi)),
            default=None,
        )
        return lo, hi

    # -- the memory line --------------------------------------------------------------------
    def _peaks(self) -> list[tuple[int, int]]:
        """(batch, peak) of every fitting trial with a peak, by batch."""
        return sorted(
            (b, o.peak_bytes)
            for b, o in self.outcomes.items()
            if o.fits and o.peak_bytes is not None
        )

    def line(self) -> tuple[float, float] | None:
        return None if self.capacity is None else fit_memory_line(self._peaks())

    def trusted_line(self) -> tuple[float, float] | None:
        """The line, when the three largest fitting trials agree on it well enough to jump
        along it: the slopes of their two segments within ``_SLOPE_AGREEMENT`` of each other,
        and a rise across them of at least ``_VISIBLE_RISE`` of the capacity (below that,
        allocator rounding is most of the difference)."""
        points = self._peaks()
        if self.capacity is None or len(points) < 3:
            return None
        (b1, p1), (b2, p2), (b3, p3) = points[-3:]
        low, high = (p2 - p1) / (b2 - b1), (p3 - p2) / (b3 - b2)
        if low <= 0 or high <= 0 or abs(high - low) > _SLOPE_AGREEMENT * high:
            return None
        if p3 - p1 < _VISIBLE_RISE * self.capacity:
            return None
        return fit_memory_line(points)

    def edge(self) -> int | None:
        """The largest batch the line puts within the capacity (None: no line)."""
        fitted = self.line()
        if fitted is None or self.capacity is None:
            return None
        a, k = fitted
        return max(0, _down((self.capacity - a) / k, 1))

    # -- phases -----------------------------------------------------------------------------
    def grow(self, start: int) -> tuple[int | None, int | None]:
        """Grow from ``start`` by :data:`GROWTH` (doubling at granularity pow2) until a
        failure, timed while throughput still rises; leave for the edge as soon as the
        memory line is trusted (``narrow`` then jumps along it); halve from ``start`` if
        ``start`` fails."""
        batch = start
        if not self.run(batch, "grow", timed=True):
            hi = batch
            while batch > 1:
                batch //= 2
                if self.run(batch, "shrink", timed=True):
                    return batch, hi
                hi = batch
            return None, hi
        factor = 2 if self.granularity == "pow2" else GROWTH
        while True:
            if self.max_batch is not None and batch >= self.max_batch:
                return batch, None
            if self._may_jump(batch):
                return batch, None  # narrow's first prediction is the jump
            flat = plateaued(self._timed(), self.tolerance)
            nxt = batch * factor if self.max_batch is None else min(batch * factor, self.max_batch)
            if not self.run(nxt, "grow", timed=not flat):
                return batch, nxt
            batch = nxt

    def _may_jump(self, batch: int) -> bool:
        """The line is trusted and puts the edge within :data:`_JUMP_REACH` x ``batch``
        (further, a slope a few percent off misses by more than the growth trials to
        get there cost: they are a quarter of the edge's batch or less)."""
        fitted = self.trusted_line() if self.granularity != "pow2" else None
        if fitted is None or self.capacity is None:
            return False
        a, k = fitted
        return (self.capacity - a) / k <= _JUMP_REACH * batch

    def _timed(self) -> list[Outcome]:
        """The outcomes of the trials run timed (a fit-only trial's one step is not)."""
        return [self.outcomes[s.batch_size] for s in self.steps_done if s.timed]

    def narrow(self, lo: int, hi: int | None) -> tuple[int, int | None]:
        """Shrink ``(lo, hi)`` to adjacent grid points (``hi`` None: no failure yet, up to
        ``max_batch``): predict + confirm, else bisect (or, with no failure yet, extend by
        growing steps).

        The line is trusted only where it says something new: a line that predicts outside
        ``(lo, hi)`` contradicts a trial, and a line that already missed (no new fitting
        point since) would only miss next door again; bisection halves the interval instead.
        """
        g = self.granularity
        assert g != "pow2"
        predictions = 0
        missed: tuple[float, float] | None = None
        reach = g
        while True:
            if hi is None:
                if self.max_batch is not None and lo >= self.max_batch:
                    return lo, None
                first, last = lo + g, self.max_batch or _NO_LIMIT
                first = first // g * g
            else:
                grid = _grid_between(lo, hi, g)
                if grid is None:
                    return lo, hi
                first, last = grid
            fitted = self.line()
            guess = None
            short = False  # the line puts the edge at or below a batch that fitted
            if fitted is not None and self.capacity is not None and fitted != missed:
                a, k = fitted
                raw = _down((self.capacity - a) / k, g)
                if hi is None and self.max_batch is not None:
                    raw = min(raw, self.max_batch)
                if predictions < _MAX_PREDICTIONS and first <= raw <= last:
                    guess = raw
                short = raw < first
            if guess is not None:
                predictions += 1
                if self.first_prediction is None:
                    self.first_prediction = guess
                if self.run(guess, "predict" if hi is not None else "jump"):
                    lo = guess
                    above = guess + g
                    if (hi is None or above < hi) and above <= last:
                        if self.run(above, "confirm"):
                            lo = above
                        else:
                            hi = above
                else:
                    hi = guess
                    missed = fitted
                    if guess - g > lo:
                        if self.run(guess - g, "confirm"):
                            lo = guess - g
                        else:
                            hi = guess - g
                continue
            if hi is None or short:
                # no failure yet and no line to follow, or a line a little short of a fit
                # (measured: ResNet's line put its edge at 672, the trial there fitted and
                # bisection towards the failure at 1024 took 8 trials): steps that double
                batch = min((lo + reach) // g * g, last)
                reach *= 2
                if self.run(batch, "extend"):
                    lo = batch
                else:
                    hi = batch
                continue
            mid = (lo + hi) // 2 // g * g
            mid = min(max(mid, first), last)
            if self.run(mid, "bisect"):
                lo = mid
            else:
                hi = mid

    def safe(self, max_fit: int) -> int | None:
        """Largest fitting batch with peak <= (1 - headroom) * capacity: the best measured,
        or the one the line puts there when that is larger. The line's batch is tried unless
        the line's first prediction was the edge, to 1% or a granule (then its peaks near the
        capacity are measured to be right, and every batch below the largest fit fits: no
        trial)."""
        capacity = self.safe_capacity
        if capacity is None:
            return None
        target = (1 - self.headroom) * capacity
        best = measured(
            self.outcomes.values(), below=None, capacity_bytes=capacity, headroom=self.headroom
        ).safe_batch
        fitted = self.line()
        if fitted is None:
            return best
        a, k = fitted
        step = 1 if self.granularity == "pow2" else self.granularity
        guess = _down((target - a) / k, step)
        if self.granularity == "pow2" and guess >= 1:
            guess = 1 << (guess.bit_length() - 1)
        if (
            guess < 1
            or guess > max_fit
            or guess in self.outcomes
            or (best is not None and guess <= best + max(step - 1, _SAFE_SLACK * best))
        ):
            return best  # (a trial landed on it, or within a few percent of it)
        first = self.first_prediction
        if first is not None and abs(max_fit - first) <= max(step, _LINE_RIGHT * max_fit):
            self.safe_from_line = True  # the line's first prediction was the edge
            return guess
        self.run(guess, "safe")
        return guess if _within(self.outcomes[guess], target) else best

    def peak_on_line(self, batch: int) -> int | None:
        """The line's peak at ``batch`` (bytes; None: no line)."""
        fitted = self.line()
        return None if fitted is None else round(fitted[0] + fitted[1] * batch)
