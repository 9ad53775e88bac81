"""Frozen results of a probe, and their versioned JSON form.

Raw data only (bytes, seconds, counts); statistics are properties; ``None`` means unknown.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "LearningRateAdvice",
    "ProbeResult",
    "Recommendations",
    "Trial",
    "write_text_atomic",
]

#: 2: recommendations gained the noise scale, the goodput-optimal range and batch plans;
#: learning-rate advice gained ``advice``. 3: distributed probes: trials gained ``ranks``
#: (each rank's readings), recommendations ``world_size``. 4: the trial plan and the time
#: limit: fit-only trials (one ``step_times_s`` reading, or none), ``search`` (how it ended:
#: ``safe_peak_estimate`` when the safe batch is the memory line's), ``partial``; the
#: fitted time-optimal rule's ``step_time_spread``, ``time_optimal_noisy``,
#: ``time_optimal_agreement``, ``time_optimal_noise_range``, ``throughput_model``.
#: Older results load unchanged.
SCHEMA_VERSION = 5


@dataclass(frozen=True)
class Trial:
    """One batch size, run as real training steps in a worker (or in-process).

    Attributes:
        batch_size: samples per step.
        fits: every step completed without an allocation failure.
        step_times_s: wall time of each timed step, device-synchronised (warm-up excluded).
        steps_run: steps completed, warm-up included (0 only when the first step failed).
        peak_bytes: the peak compared with ``capacity_bytes`` of the probe: on CUDA the
            allocator's peak reserved bytes (``MemoryProfile.peak_bytes`` is peak allocated);
            on CPU the peak address space above the worker's baseline (what the budget
            limits).
        peak_allocated_bytes: CUDA: allocator peak allocated. CPU: None.
        peak_reserved_bytes: CUDA: allocator peak reserved. CPU: None.
        device_used_bytes: CUDA: NVML device memory used after the steps. CPU: None.
        device_total_bytes: CUDA: NVML total device memory. CPU: None.
        peak_rss_bytes: peak resident set size of the process running the trial.
        state_bytes: live tensor bytes after the steps: weights, gradients, optimizer state.
        failure: None, ``"oom"``, ``"crash"`` (worker died) or ``"timeout"``.
        error: the allocator's message or the worker's exit reason when it did not fit.
        wall_s: seconds for the whole trial, including batch creation and any worker restart.
        phase: why the search tried this batch (grow, predict, confirm, bisect, safe...).
        ranks: under torchrun, each rank's own readings, one dict per rank (``rank``,
            ``fits``, ``step_s``, ``peak_bytes``, ``peak_rss_bytes``, ``peak_reserved_bytes``,
            ``state_bytes``, ``failure``, ``error``); the fields above are then the agreed
            values: fits on every rank, the slowest rank's step times, the largest rank's
            memory. Not a count: that is ``Recommendations.world_size`` (or ``.ranks``).
    """

    batch_size: int
    fits: bool
    step_times_s: tuple[float, ...] = ()
    steps_run: int = 0
    peak_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    device_used_bytes: int | None = None
    device_total_bytes: int | None = None
    peak_rss_bytes: int | None = None
    state_bytes: int | None = None
    failure: str | None = None
    error: str | None = None
    wall_s: float | None = None
    phase: str | None = None
    ranks: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        """Rebuild a trial from ``asdict`` output; derived keys (``step_s``...) are ignored."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        values["step_times_s"] = tuple(values.get("step_times_s", ()))
        values["ranks"] = tuple(values.get("ranks", ()))
        return cls(**values)

    @property
    def step_s(self) -> float | None:
        """Median timed step, in seconds."""
        return statistics.median(self.step_times_s) if self.step_times_s else None

    @property
    def samples_per_s(self) -> float | None:
        """Throughput at the median step time."""
        step = self.step_s
        return self.batch_size / step if step else None

    @property
    def timed(self) -> bool:
        """The trial timed at least one step (a trial that only asks "does it fit" times
        its last, as one reading, when it runs two or more)."""
        return bool(self.step_times_s)

    @property
    def step_time_spread(self) -> float | None:
        """Range of the timed steps over their median: 0.18 when the slowest took 18% of the
        median longer than the fastest. None with fewer than two timed steps.

        With the 1-3 timed steps a trial has, quantile statistics (IQR, MAD) are the range
        itself or drop one of three points; the range is the one that uses them all and
        reads as said. Robustness comes where trials are pooled: the probe's noise level is
        the median of this over its trials (one trial hit by a burst does not make the
        machine noisy).
        """
        times = self.step_times_s
        if len(times) < 2:
            return None
        middle = statistics.median(times)
        return (max(times) - min(times)) / middle if middle > 0 else None


@dataclass(frozen=True)
class LearningRateAdvice:
    """A learning rate scaled from a reference (``base_lr`` at ``base_batch``).

    Attributes:
        rule: ``"linear"``, ``"sqrt"``, ``"noise"`` (noise-capped) or ``"none"``.
        base_lr: the reference learning rate.
        base_batch: the batch size the reference was tuned at.
        batch_size: the batch the advice is for.
        lr: the scaled learning rate.
        warmup_epochs: suggested linear warm-up length (0: none needed).
        warmup_steps: the same in steps, when the dataset size is known.
        note: one line of why, with its source.
        advice: further advice (the noise-capped ceiling for Adam, Adam's betas for a
            large factor).
    """

    rule: str
    base_lr: float
    base_batch: int
    batch_size: int
    lr: float
    warmup_epochs: float
    warmup_steps: int | None
    note: str
    advice: tuple[str, ...] = ()

    @property
    def factor(self) -> float:
        """How much larger the batch is than the reference."""
        return self.batch_size / self.base_batch


@dataclass(frozen=True)
class Recommendations:
    """What the probe recommends; every batch named here was a real, fitting trial.

    Attributes:
        max_batch: largest batch that fits, at the granularity.
        first_failure: the next batch tried above it, which did not fit.
        max_pow2_batch: largest power of two that fits.
        safe_batch: largest batch whose peak left ``headroom`` of capacity free.
        headroom: fraction of capacity the safe batch leaves free.
        time_optimal_batch: without a noise scale, the smallest fitting batch within
            ``throughput_tolerance`` of the best samples/s of the throughput model fitted to
            the timed trials (the knee); with one, the fitting batch minimising
            ``(B + B_noise) / samples/s`` on that model (time to a target loss).
        throughput_tolerance: the tolerance used (0.05: within 5%).
        learning_rate: LR advice for the time-optimal batch (None without ``base_lr``).
        capped_by_max_batch: the search stopped at the user's ``max_batch``.
        time_optimal_basis: ``"throughput"`` (the knee) or ``"noise-scale"``.
        time_optimal_range: with a noise scale, the smallest and largest measured batch
            within the tolerance of the best time to target (the flat region).
        noise_scale: the measured gradient noise scale (``NoiseScale.to_dict()``), if any.
        global_batch: the global batch plans were asked for; ranks: over this many ranks
            (a count; ``Trial.ranks`` holds per-rank readings).
        plans: micro-batch x accumulation x ranks for ``global_batch``, fastest first
            (``BatchPlan`` fields, and ``global_batch``).
        world_size: ranks the trials ran on together (torchrun). Above 1, every batch
            here is per rank, and the learning rate is for the global batch (the
            time-optimal batch x ``world_size``).
        step_time_spread: the probe's noise level: the median over timed trials of
            :attr:`Trial.step_time_spread` (None: no trial had two timed steps).
        time_optimal_noisy: reruns would likely give another time-optimal batch: fewer than
            80% of a seeded bootstrap over the step times agreed with it.
        time_optimal_agreement: the fraction of those resamples that gave it (None: not
            computed, e.g. a result from before the rule).
        time_optimal_noise_range: when noisy, the 5th-95th percentile of the resampled
            answers: the batches reruns are likely to give.
        throughput_model: the fitted step time ``fixed_s + per_sample_s * b + per_sample2_s
            * b**2`` behind the time-optimal batch, with ``points`` and ``residual``.
        lr_range: the LR range test at the time-optimal batch, when data was given
            (:meth:`bsfinder.lr.LRRangeResult.to_dict`: the suggestion, every rule's value,
            the curve), with ``recommended`` (``"range-test"`` or ``"reference"``: which LR
            ``learning_rate`` holds), ``why``, and ``reference`` (the scaled advice from
            ``base_lr``, when given, as a dict).
    """

    max_batch: int | None
    first_failure: int | None
    max_pow2_batch: int | None
    safe_batch: int | None
    headroom: float
    time_optimal_batch: int | None
    throughput_tolerance: float
    learning_rate: LearningRateAdvice | None = None
    capped_by_max_batch: bool = False
    time_optimal_basis: str = "throughput"
    time_optimal_range: tuple[int, int] | None = None
    noise_scale: dict[str, Any] | None = None
    global_batch: int | None = None
    ranks: int = 1
    plans: tuple[dict[str, Any], ...] = ()
    world_size: int = 1
    step_time_spread: float | None = None
    time_optimal_noisy: bool = False
    time_optimal_agreement: float | None = None
    time_optimal_noise_range: tuple[int, int] | None = None
    throughput_model: dict[str, Any] | None = None
    lr_range: dict[str, Any] | None = None

    @property
    def global_time_optimal_batch(self) -> int | None:
        """The time-optimal batch summed over the ranks (per rank x ``world_size``)."""
        batch = self.time_optimal_batch
        return None if batch is None else batch * self.world_size


@dataclass(frozen=True)
class ProbeResult:
    """Everything one probe measured and concluded; JSON-serialisable with a schema version.

    Attributes:
        trials: every trial, in the order run.
        recommendations: what to use (see :class:`Recommendations`).
        capacity_bytes: the memory trials were compared against (GPU: device or cap; CPU:
            the budget).
        device: what ran the trials (kind, name, totals, UUID...).
        workload: model, inputs, optimizer, precision, steps, allocator settings...
        environment: versions of Python, torch, bsfinder; platform.
        interrupted: the user stopped the probe; the trials are what was measured until then.
        duration_s: wall seconds for the whole probe.
        notes: things the user should know (fallbacks taken, settings to reproduce).
        runner: how trials ran: isolation, worker starts and the seconds they took.
        search: how the search ended: ``stop_reason`` (``converged``, ``max-batch``,
            ``nothing-fits``, ``time-limit``), ``time_limit_s``, ``capped_by`` (what bound
            the batch: ``max-batch`` or ``dataset-size``), and at a time limit
            ``edge_estimate`` (where the memory line puts the largest batch, not tried),
            ``next_batch`` and ``next_trial_s`` (the trial not started, its predicted
            seconds). ``safe_peak_estimate``: the line's peak at the safe batch, when that
            batch was not run on its own (the line's first prediction was the edge). Empty
            in results from before it was recorded.
    """

    trials: tuple[Trial, ...]
    recommendations: Recommendations
    capacity_bytes: int | None
    device: dict[str, Any] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    duration_s: float | None = None
    notes: tuple[str, ...] = ()
    runner: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def partial(self) -> bool:
        """The search stopped before its answer was established: interrupted, or at the
        time limit (``max_batch`` is then what the trials so far show, a lower bound)."""
        return self.interrupted or self.search.get("stop_reason") == "time-limit"

    @property
    def max_batch(self) -> int | None:
        """Largest batch that fits (shortcut for ``recommendations.max_batch``)."""
        return self.recommendations.max_batch

    @property
    def time_optimal_batch(self) -> int | None:
        """Time-optimal batch (shortcut for ``recommendations.time_optimal_batch``)."""
        return self.recommendations.time_optimal_batch

    def trial(self, batch_size: int) -> Trial | None:
        """The last trial run at ``batch_size``, if any."""
        found = [t for t in self.trials if t.batch_size == batch_size]
        return found[-1] if found else None

    @property
    def trial_seconds(self) -> float:
        """Sum of all timed steps of all trials: the useful work of the probe."""
        return sum(sum(t.step_times_s) for t in self.trials)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with ``schema_version``."""
        data = asdict(self)
        data["trials"] = [
            {**asdict(t), "step_s": t.step_s, "samples_per_s": t.samples_per_s} for t in self.trials
        ]
        return {"schema_version": data.pop("schema_version"), "partial": self.partial, **data}

    def to_json(self) -> str:
        """The result as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        """Rebuild a result from :meth:`to_dict` output.

        Raises:
            ValueError: the data comes from a newer bsfinder (higher ``schema_version``) or is
                not a bsfinder result.
        """
        if not isinstance(data, dict):
            raise ValueError(f"the JSON is {_a(data)}, not an object")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise ValueError("not a bsfinder result: no integer 'schema_version'")
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"result has schema_version {version}, newer than this bsfinder understands "
                f"({SCHEMA_VERSION}); upgrade bsfinder to read it"
            )
        _check_shape(data)
        trials = tuple(Trial.from_dict(t) for t in data["trials"])
        rec = dict(data["recommendations"])
        lr = rec.pop("learning_rate", None)
        if lr:
            lr = LearningRateAdvice(**{**lr, "advice": tuple(lr.get("advice", ()))})
        if rec.get("time_optimal_range") is not None:
            rec["time_optimal_range"] = tuple(rec["time_optimal_range"])
        if rec.get("time_optimal_noise_range") is not None:
            rec["time_optimal_noise_range"] = tuple(rec["time_optimal_noise_range"])
        rec["plans"] = tuple(rec.get("plans", ()))
        recommendations = Recommendations(**rec, learning_rate=lr)
        return cls(
            trials=trials,
            recommendations=recommendations,
            capacity_bytes=data.get("capacity_bytes"),
            device=data.get("device", {}),
            workload=data.get("workload", {}),
            environment=data.get("environment", {}),
            interrupted=data.get("interrupted", False),
            duration_s=data.get("duration_s"),
            notes=tuple(data.get("notes", ())),
            runner=data.get("runner", {}),
            search=data.get("search", {}),
            schema_version=version,
        )

    @classmethod
    def from_json(cls, text: str) -> ProbeResult:
        """Parse :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ProbeResult:
        """Read a result written by :meth:`save`."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the result as JSON, atomically (a reader never sees half a file)."""
        write_text_atomic(path, self.to_json())


def _a(value: Any) -> str:
    """``a list``, ``a str``, ``null``: what a JSON value is, for an error message."""
    if value is None:
        return "null"
    name = {
        dict: "object",
        list: "list",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
    }.get(type(value), type(value).__name__)
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


_INT_FIELDS = ("max_batch", "first_failure", "max_pow2_batch", "safe_batch", "time_optimal_batch")


def _check_shape(data: dict[str, Any]) -> None:
    """Raise ValueError unless ``data`` has the shape of a probe result's JSON (the fields
    that rendering and comparing rely on), naming the first field that is wrong."""
    for key in ("trials", "recommendations"):
        if key not in data:
            raise ValueError(f"{key!r} is missing")
    trials = data["trials"]
    if not isinstance(trials, list):
        raise ValueError(f"'trials' is {_a(trials)}, not a list of trials")
    for i, trial in enumerate(trials):
        if not isinstance(trial, dict):
            raise ValueError(f"trial {i} is {_a(trial)}, not an object")
        batch, fits = trial.get("batch_size"), trial.get("fits")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"trial {i}: 'batch_size' is {batch!r}, not a positive integer")
        if not isinstance(fits, bool):
            raise ValueError(f"trial {i}: 'fits' is {fits!r}, not true or false")
        times = trial.get("step_times_s", [])
        if not isinstance(times, list) or not all(
            isinstance(t, int | float) and not isinstance(t, bool) for t in times
        ):
            raise ValueError(f"trial {i}: 'step_times_s' is {times!r}, not a list of seconds")
    if not isinstance(data.get("search", {}), dict):
        raise ValueError(f"'search' is {_a(data['search'])}, not an object")
    rec = data["recommendations"]
    if not isinstance(rec, dict):
        raise ValueError(f"'recommendations' is {_a(rec)}, not an object")
    for key in _INT_FIELDS:
        value = rec.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"recommendations: {key!r} is {value!r}, not an integer or null")
    lr = rec.get("learning_rate")
    if lr is not None and not isinstance(lr, dict):
        raise ValueError(f"recommendations: 'learning_rate' is {_a(lr)}, not an object")
    for key in ("device", "workload", "environment", "runner"):
        if not isinstance(data.get(key, {}), dict):
            raise ValueError(f"{key!r} is {_a(data[key])}, not an object")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` and a newline to ``path`` through a temporary file in the same folder
    and a rename, so a reader never sees half a file: results' JSON, the HTML report."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
