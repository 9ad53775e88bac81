"""A probe: the search over a trial runner, turned into a :class:`ProbeResult`."""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from bsfinder.core.recommend import (
    goodput_choice,
    goodput_optimal_batch,
    plan_global_batch,
    scale_learning_rate,
    time_optimal,
)
from bsfinder.core.results import ProbeResult, Recommendations, Trial
from bsfinder.core.search import (
    THROUGHPUT_TOLERANCE,
    Granularity,
    SearchResult,
    measured,
    search,
)
from bsfinder.errors import SpecError, UserCodeError, is_batchnorm_one_sample
from bsfinder.execution.runner import RunnerInfo, TrialRunner
from bsfinder.options import (
    DEFAULT_TIME_LIMIT_S,
    RecommendOptions,
    SearchOptions,
    WorkloadOptions,
)

__all__ = [
    "ProbeEvent",
    "ProbeSettings",
    "recommend",
    "run_probe",
    "search_cap",
    "with_noise_scale",
]


@dataclass(frozen=True)
class ProbeSettings:
    """How to search and what to recommend (see :func:`bsfinder.find_batch_size`)."""

    start_batch: int = SearchOptions.start_batch
    max_batch: int | None = SearchOptions.max_batch
    granularity: Granularity = SearchOptions.granularity
    headroom: float = RecommendOptions.headroom
    memory_model: bool = SearchOptions.memory_model
    time_limit_s: float | None = DEFAULT_TIME_LIMIT_S
    throughput_tolerance: float = THROUGHPUT_TOLERANCE
    base_lr: float | None = RecommendOptions.base_lr
    base_batch: int | None = RecommendOptions.base_batch
    lr_rule: str = RecommendOptions.lr_rule
    optimizer: str = WorkloadOptions.optimizer
    dataset_size: int | None = RecommendOptions.dataset_size
    global_batch: int | None = RecommendOptions.global_batch
    ranks: int = 1
    world_size: int = 1
    #: the step's mode (``WorkloadOptions.mode``): eval and infer get no learning rate
    mode: str = WorkloadOptions.mode


@dataclass(frozen=True)
class ProbeEvent:
    """Progress, for a callback: ``started``, ``trial``, ``step``, ``trial-done``; after the
    search, with data, ``noise``, ``lr-range``, ``lr-step`` and ``lr-range-done``.

    ``index`` counts trials from 1; ``step``/``total_steps`` count steps within one trial
    (or the LR range test's sweep).
    """

    kind: str
    index: int = 0
    batch_size: int | None = None
    step: int = 0
    total_steps: int = 0
    trial: Trial | None = None
    info: RunnerInfo | None = None


def run_probe(
    runner: TrialRunner,
    settings: ProbeSettings,
    *,
    on_event: Callable[[ProbeEvent], None] | None = None,
) -> ProbeResult:
    """Start ``runner``, search, recommend, close ``runner``; Ctrl-C keeps what was measured.

    Trials that only decide whether a batch fits run untimed (see
    :func:`~bsfinder.core.search.search`); the search never goes past ``max_batch`` or,
    unless ``max_batch`` is given, a known ``dataset_size`` (per rank); it starts no trial
    that would end after ``time_limit_s`` (counted from the start, the runner's start-up
    included; under torchrun the trials only) and then answers with what it established,
    marked partial. A first trial at batch 1 that BatchNorm refuses (one sample cannot be
    normalised in training) is no trial: the search starts again at 2, as with
    ``start_batch=2``, and a note says so.

    Raises:
        UserCodeError: the model raised a non-OOM exception (after the runner is closed).
    """
    emit = on_event or (lambda event: None)
    started = time.perf_counter()
    trials: list[Trial] = []
    interrupted = False
    outcome: SearchResult | None = None
    info = RunnerInfo(capacity_bytes=None)
    cap, capped_by = search_cap(settings)
    start_batch = settings.start_batch
    notes: list[str] = []  # the probe's own, after the runner's
    try:
        info = runner.start()
        emit(ProbeEvent("started", info=info))

        def trial_at(batch_size: int, timed: bool) -> Trial:
            index = len(trials) + 1
            emit(ProbeEvent("trial", index=index, batch_size=batch_size))

            def on_step(done: int, total: int) -> None:
                emit(ProbeEvent("step", index, batch_size, step=done, total_steps=total))

            trial = runner.run_trial(batch_size, on_step, timed=timed)
            if trial.fits and trial.steps_run < 1:
                raise AssertionError(f"trial at batch {batch_size} fitted without a step")
            trials.append(trial)
            emit(ProbeEvent("trial-done", index, batch_size, trial=trial))
            return trial

        def search_from(start: int) -> SearchResult:
            limit = settings.time_limit_s
            if limit is not None and settings.world_size == 1:
                # start-up counts too; under torchrun only the trials (agreed by every rank,
                # so that all take the same decisions and none waits for a trial alone)
                limit -= time.perf_counter() - started
            return search(
                lambda b: trial_at(b, True),
                check_fit=lambda b: trial_at(b, False),
                capacity_bytes=info.capacity_bytes,
                start=start,
                max_batch=cap,
                granularity=settings.granularity,
                memory_model=settings.memory_model,
                headroom=settings.headroom,
                time_limit_s=limit,
                steps=info.trial_steps,
                tolerance=settings.throughput_tolerance,
            )

        # a model that does not fit before any step leaves the search nothing to try
        if info.build_failure is None:
            try:
                outcome = search_from(start_batch)
            except UserCodeError as exc:
                # BatchNorm cannot train on one sample: batch 1 is too small, not the model
                # wrong. The failed trial raised, so it is no trial: the search starts afresh
                # at 2, as with --start-batch 2. Under torchrun every rank raised this same
                # (agreed) error after the same agreed trials, so all restart together.
                if trials or not is_batchnorm_one_sample(exc) or (cap is not None and cap < 2):
                    raise
                start_batch = 2
                notes.append("BatchNorm cannot train on one sample: the search started at 2")
                outcome = search_from(start_batch)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        try:
            runner.close()
        except KeyboardInterrupt:  # the stop itself was interrupted: finish it, keep the trials
            interrupted = True
            runner.close()
    if outcome is not None:
        phases = [step.phase for step in outcome.steps]
        trials = [replace(t, phase=p) for t, p in zip(trials, phases, strict=True)]
    return ProbeResult(
        trials=tuple(trials),
        recommendations=_recommend(trials, outcome, info.capacity_bytes, settings, None),
        capacity_bytes=info.capacity_bytes,
        device=info.device,
        workload={
            **info.workload,
            "start_batch": start_batch,
            "max_batch": settings.max_batch,
            "granularity": settings.granularity,
            "memory_model": settings.memory_model,
        },
        environment=environment(),
        interrupted=interrupted,
        duration_s=time.perf_counter() - started,
        notes=info.notes
        + ((f"the model itself does not fit: {info.build_failure}",) if info.build_failure else ())
        + tuple(notes),
        runner=runner.stats(),
        search=_search_record(outcome, settings, capped_by),
    )


def search_cap(settings: ProbeSettings) -> tuple[int | None, str | None]:
    """The largest batch the search may try, and what sets it: ``max_batch`` when given,
    else a known data set's size per rank (a batch larger than the data set is never what a
    user wants unless asked for), else none."""
    if settings.max_batch is not None:
        return settings.max_batch, "max-batch"
    if settings.dataset_size is not None:
        return max(1, settings.dataset_size // max(1, settings.world_size)), "dataset-size"
    return None, None


def _search_record(
    outcome: SearchResult | None, settings: ProbeSettings, capped_by: str | None
) -> dict[str, Any]:
    """How the search ended, for :attr:`ProbeResult.search`."""
    record: dict[str, Any] = {"time_limit_s": settings.time_limit_s}
    if outcome is None:
        return {**record, "stop_reason": None}
    record["stop_reason"] = outcome.stop_reason
    record["capped_by"] = capped_by if outcome.stop_reason == "max-batch" else None
    if outcome.safe_from_line:
        record["safe_peak_estimate"] = outcome.safe_peak_estimate
    if outcome.stop_reason == "time-limit":
        record |= {
            "edge_estimate": outcome.edge_estimate,
            "next_batch": outcome.next_batch,
            "next_trial_s": outcome.next_trial_s,
        }
    return record


def _recommend(
    trials: list[Trial],
    outcome: SearchResult | None,
    capacity: int | None,
    settings: ProbeSettings,
    noise: Any,
) -> Recommendations:
    if outcome is not None:
        max_batch = outcome.max_batch
        first_failure = outcome.first_failure
        max_pow2 = outcome.max_pow2_batch
        safe = outcome.safe_batch
        capped = outcome.stop_reason == "max-batch"
    else:  # interrupted: what the trials so far establish, below the smallest failure
        first_failure = min((t.batch_size for t in trials if not t.fits), default=None)
        max_batch, max_pow2, safe = measured(
            trials, below=first_failure, capacity_bytes=capacity, headroom=settings.headroom
        )
        capped = False
    return recommend(
        trials,
        settings,
        noise,
        max_batch=max_batch,
        first_failure=first_failure,
        max_pow2_batch=max_pow2,
        safe_batch=safe,
        capped_by_max_batch=capped,
    )


def recommend(
    trials: list[Trial] | tuple[Trial, ...],
    settings: ProbeSettings,
    noise: Any = None,
    *,
    max_batch: int | None,
    first_failure: int | None,
    max_pow2_batch: int | None,
    safe_batch: int | None,
    capped_by_max_batch: bool = False,
) -> Recommendations:
    """The time-optimal batch (by noise scale when ``noise``, a
    :class:`~bsfinder.noise.scale.NoiseScale`, is given, else the throughput knee), its learning
    rate and the global-batch plans, from the trials up to ``max_batch``."""
    usable = [t for t in trials if t.fits and (max_batch is None or t.batch_size <= max_batch)]
    tolerance = settings.throughput_tolerance
    knee = time_optimal(usable, tolerance=tolerance)
    optimal = knee.batch
    basis, flat = "throughput", None
    usable_noise = noise is not None and math.isfinite(noise.b_simple)
    if usable_noise:
        found = goodput_optimal_batch(
            usable, noise.b_simple, tolerance=tolerance, granularity=settings.granularity
        )
        if found is not None:
            (optimal, flat), basis = found, "noise-scale"
            # the same model and bootstrap, on the time-to-target rule
            choose = goodput_choice(noise.b_simple, tolerance, settings.granularity)
            knee = time_optimal(usable, choose=choose)
    lr = None
    if settings.base_lr is not None and optimal is not None and settings.mode == "train":
        lr = scale_learning_rate(
            base_lr=settings.base_lr,
            base_batch=settings.base_batch or 1,
            batch_size=optimal * settings.world_size,  # the global batch it trains
            rule=settings.lr_rule,
            optimizer=settings.optimizer,
            dataset_size=settings.dataset_size,
            noise_scale=noise.b_simple if usable_noise else None,
        )
    plans: tuple[dict[str, Any], ...] = ()
    if settings.global_batch is not None and usable:
        try:
            found_plans = plan_global_batch(
                usable, settings.global_batch, ranks=settings.ranks, max_batch=max_batch
            )
        except SpecError:  # nothing measured makes it: the summary says so
            found_plans = ()
        plans = tuple({**asdict(p), "global_batch": p.global_batch} for p in found_plans)
    return Recommendations(
        max_batch=max_batch,
        first_failure=first_failure,
        max_pow2_batch=max_pow2_batch,
        safe_batch=safe_batch,
        headroom=settings.headroom,
        time_optimal_batch=optimal,
        throughput_tolerance=settings.throughput_tolerance,
        learning_rate=lr,
        capped_by_max_batch=capped_by_max_batch,
        time_optimal_basis=basis,
        time_optimal_range=flat,
        noise_scale=None if noise is None else noise.to_dict(),
        global_batch=settings.global_batch,
        ranks=settings.ranks,
        plans=plans,
        world_size=settings.world_size,
        step_time_spread=knee.step_time_spread,
        time_optimal_noisy=knee.noisy,
        time_optimal_agreement=knee.agreement if optimal is not None else None,
        time_optimal_noise_range=(
            (knee.low, knee.high)
            if knee.noisy and knee.low is not None and knee.high is not None
            else None
        ),
        throughput_model=None if knee.model is None else asdict(knee.model),
    )


def with_noise_scale(result: ProbeResult, noise: Any, settings: ProbeSettings) -> ProbeResult:
    """``result`` with its recommendations redone for a measured noise scale."""
    rec = result.recommendations
    return replace(
        result,
        recommendations=recommend(
            result.trials,
            settings,
            noise,
            max_batch=rec.max_batch,
            first_failure=rec.first_failure,
            max_pow2_batch=rec.max_pow2_batch,
            safe_batch=rec.safe_batch,
            capped_by_max_batch=rec.capped_by_max_batch,
        ),
    )


def environment() -> dict[str, Any]:
    """Versions and platform, for the result header."""
    from bsfinder._version import __version__

    env: dict[str, Any] = {
        "bsfinder": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
    return env
