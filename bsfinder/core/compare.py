"""Two probe results side by side: deltas, thresholds, and whether a change is a regression.

For users who run bsfinder in CI: probe the model on every change, keep the main branch's
result as the base, and fail the job when the largest batch, the memory per sample or the
speed moves past a threshold (``bsfinder compare base.json new.json --fail-on
max-batch:-5%``). Pure functions over :class:`~bsfinder.core.results.ProbeResult`; only the CLI
prints.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from bsfinder.core.fit import least_squares_line
from bsfinder.core.recommend import step_time_spread
from bsfinder.core.results import ProbeResult
from bsfinder.errors import SpecError

__all__ = ["METRICS", "Comparison", "MetricDelta", "Threshold", "compare", "parse_threshold"]

#: metric -> (description, which direction is better)
METRICS: dict[str, tuple[str, str]] = {
    "max-batch": ("largest batch that fits", "higher"),
    "peak-per-sample": ("peak memory per sample (slope over fitting trials)", "lower"),
    "samples-per-s": ("samples/s at the largest batch both measured", "higher"),
    "time-optimal": ("time-optimal batch", "higher"),
}
_THRESHOLD = re.compile(r"^(?P<metric>[a-z-]+):(?P<value>[+-]?\d+(\.\d+)?)%$")


@dataclass(frozen=True)
class Threshold:
    """Fail when ``metric`` changes by ``percent`` or more in that direction: ``-5`` fails a
    drop of 5% or more, ``+10`` a rise of 10% or more."""

    metric: str
    percent: float

    def breached(self, change: float | None) -> bool:
        if change is None:
            return False
        limit = self.percent / 100
        return change <= limit if limit < 0 else change >= limit

    def __str__(self) -> str:
        return f"{self.metric}:{self.percent:+g}%"


def parse_threshold(text: str) -> Threshold:
    """``"max-batch:-5%"`` -> Threshold. Raises SpecError with the valid forms."""
    match = _THRESHOLD.match(text.strip())
    if not match or match["metric"] not in METRICS:
        raise SpecError(
            f"--fail-on {text!r}: use METRIC:+N% or METRIC:-N% with METRIC one of "
            f"{', '.join(METRICS)} (e.g. max-batch:-5%, peak-per-sample:+10%)"
        )
    percent = float(match["value"])
    if percent == 0:
        raise SpecError(f"--fail-on {text!r}: the percentage must not be 0")
    return Threshold(match["metric"], percent)


@dataclass(frozen=True)
class MetricDelta:
    """One metric in both results. ``change`` is (new - base) / base (None if either is
    missing); ``detail`` says what was compared (e.g. the batch of the samples/s).
    ``noise``: the combined relative step-time spread of both (timing metrics);
    ``within_noise``: thresholds the change passed but the noise explains (not failed)."""

    metric: str
    base: float | None
    new: float | None
    change: float | None
    detail: str = ""
    failed: tuple[str, ...] = ()
    noise: float | None = None
    within_noise: tuple[str, ...] = ()


@dataclass(frozen=True)
class Comparison:
    """Deltas per metric, the thresholds that failed, and warnings (device, versions)."""

    deltas: tuple[MetricDelta, ...]
    warnings: tuple[str, ...]
    thresholds: tuple[Threshold, ...]

    @property
    def regressions(self) -> tuple[MetricDelta, ...]:
        return tuple(d for d in self.deltas if d.failed)

    @property
    def ok(self) -> bool:
        return not self.regressions

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "deltas": [d.__dict__ for d in self.deltas],
            "warnings": list(self.warnings),
            "thresholds": [str(t) for t in self.thresholds],
        }


def compare(
    base: ProbeResult, new: ProbeResult, thresholds: tuple[Threshold, ...] = ()
) -> Comparison:
    """Compare ``new`` against ``base`` under ``thresholds``."""
    values: list[tuple[str, float | None, float | None, str]] = [
        ("max-batch", base.max_batch, new.max_batch, ""),
        ("peak-per-sample", _per_sample(base), _per_sample(new), ""),
        (*_common_speed(base, new),),
        ("time-optimal", base.time_optimal_batch, new.time_optimal_batch, ""),
    ]
    deltas = []
    for metric, old, now, detail in values:
        change = None
        if old is not None and now is not None and old != 0:
            change = (now - old) / old
        breached = tuple(str(t) for t in thresholds if t.metric == metric and t.breached(change))
        noise = _noise(metric, base, new)
        quiet = _within_noise(metric, change, noise, base, new)
        failed = () if quiet else breached
        within = breached if quiet else ()
        deltas.append(MetricDelta(metric, old, now, change, detail, failed, noise, within))
    return Comparison(tuple(deltas), tuple(_warnings(base, new)), thresholds)


#: a samples/s change is a regression only past this many times the combined spread
NOISE_K = 1.0


def _noise(metric: str, base: ProbeResult, new: ProbeResult) -> float | None:
    """The combined relative noise of the two results' timing: the root sum of squares of
    each probe's step-time spread (range over median of a trial's timed steps, the median
    over its trials; ``Recommendations.step_time_spread``). Timing metrics only."""
    if metric not in ("samples-per-s", "time-optimal"):
        return None
    # from the trials, so that results written before the field existed have it too
    spreads = [step_time_spread([t for t in r.trials if t.fits]) for r in (base, new)]
    known = [s for s in spreads if s is not None]
    return math.sqrt(sum(s * s for s in known)) if known else None


def _within_noise(
    metric: str, change: float | None, noise: float | None, base: ProbeResult, new: ProbeResult
) -> bool:
    """samples/s: the change is no larger than ``NOISE_K`` x the combined spread (the range of
    three steps is about 1.7 standard deviations of one, so this is a wide margin: a gate
    flapped +237% / -70% on a machine whose steps varied 3x). Time-optimal: either result is
    flagged noisy and the other's batch lies in its noise range."""
    if change is None:
        return False
    if metric == "samples-per-s":
        return noise is not None and abs(change) <= NOISE_K * noise
    if metric == "time-optimal":
        for one, other in ((base, new), (new, base)):
            rec, batch = one.recommendations, other.recommendations.time_optimal_batch
            span = rec.time_optimal_noise_range
            if rec.time_optimal_noisy and span and batch and span[0] <= batch <= span[1]:
                return True
    return False


def _per_sample(result: ProbeResult) -> float | None:
    """Least-squares slope of peak bytes over batch size, fitting trials only."""
    points = [(t.batch_size, t.peak_bytes) for t in result.trials if t.fits and t.peak_bytes]
    line = least_squares_line(list(dict(points).items()))  # one point per batch (the last)
    return None if line is None else line[1]


def _common_speed(base: ProbeResult, new: ProbeResult) -> tuple[str, Any, Any, str]:
    def rates(result: ProbeResult) -> dict[int, float]:
        return {t.batch_size: t.samples_per_s for t in result.trials if t.fits and t.samples_per_s}

    old, now = rates(base), rates(new)
    common = sorted(set(old) & set(now))
    if not common:
        return ("samples-per-s", None, None, "no batch measured in both")
    batch = common[-1]
    return ("samples-per-s", old[batch], now[batch], f"at batch {batch}")


def _warnings(base: ProbeResult, new: ProbeResult) -> list[str]:
    found = []
    for key in ("kind", "name", "total_bytes"):
        a, b = base.device.get(key), new.device.get(key)
        if a != b:
            found.append(f"device {key} differs: {a} vs {b}")
    if base.capacity_bytes != new.capacity_bytes:
        found.append(f"capacity differs: {base.capacity_bytes} vs {new.capacity_bytes} bytes")
    for key in ("torch", "bsfinder", "cuda", "python"):
        a, b = base.environment.get(key), new.environment.get(key)
        if a != b:
            found.append(f"{key} differs: {a} vs {b}")
    for key in ("model", "inputs", "optimizer", "precision"):
        a, b = base.workload.get(key), new.workload.get(key)
        if a != b:
            found.append(f"workload {key} differs: {a} vs {b}")
    if base.interrupted or new.interrupted:
        found.append("a result was interrupted: its numbers are incomplete")
    if found:
        found.append("numbers from different setups are not comparable like for like")
    return found
