"""One trial: warm-up and timed training steps at one batch size, with memory readings."""

from __future__ import annotations

import gc
import time

from bsfinder.core.results import Trial
from bsfinder.devices.base import DeviceBackend, MemoryReading
from bsfinder.errors import UserCodeError, describe_oom
from bsfinder.execution.runner import StepCallback
from bsfinder.workload.step import Workload

__all__ = ["execute_trial", "oom_or_model_error"]


def oom_or_model_error(
    exc: BaseException, *, under_memory_limit: bool, batch_size: int | None
) -> str | UserCodeError:
    """What an exception from the model means (call inside ``except``): an allocation
    failure, as its one-line description (see :func:`bsfinder.errors.describe_oom`), or the
    model's own error, wrapped with its traceback (``batch_size`` None: while building)."""
    reason = describe_oom(exc, under_memory_limit=under_memory_limit)
    if reason is not None:
        return reason
    return UserCodeError.from_exception(exc, batch_size=batch_size)


def execute_trial(
    workload: Workload,
    backend: DeviceBackend,
    batch_size: int,
    *,
    warmup_steps: int,
    steps: int,
    on_step: StepCallback | None = None,
    interrupts_are_model: bool = False,
) -> Trial:
    """Run ``warmup_steps + steps`` full training steps; time each, read the peak.

    An allocation failure (see :func:`bsfinder.errors.oom_kind`) gives a Trial with
    ``fits=False``; any other exception raises :class:`UserCodeError`, and so does a
    ``SystemExit`` from the model. ``interrupts_are_model``: a ``KeyboardInterrupt`` is the
    model's too (in a trial process, which no terminal signal reaches); otherwise it is the
    user's Ctrl-C and propagates.
    """
    started = time.perf_counter()
    total = warmup_steps + steps
    times: list[float] = []
    done = 0
    failure: str | None = None
    user_error: UserCodeError | None = None
    reading = MemoryReading()
    state_bytes = None
    batch = None
    backend.reset_peak()
    try:
        batch = workload.make_batch(batch_size)
        workload.begin_trial()
        per_call = workload.batches_per_step  # a step of several batches: time per batch
        for i in range(total):
            backend.synchronize()
            t0 = time.perf_counter()
            workload.step(batch)
            backend.synchronize()
            elapsed = (time.perf_counter() - t0) / per_call
            done += 1
            if i >= warmup_steps:
                times.append(elapsed)
            if on_step is not None:
                on_step(done, total)
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt) and not interrupts_are_model:
            raise
        # Only record here: the traceback holds the failed step's tensors (pytorch#18853),
        # which are released once we leave this block.
        outcome = oom_or_model_error(
            exc, under_memory_limit=backend.under_limit, batch_size=batch_size
        )
        if isinstance(outcome, str):
            failure = outcome
        else:
            user_error = outcome
    else:
        # bsfinder's own readings: after the steps, before cleanup returns memory to the
        # device, and outside the except above, so that their failure is never the user's bug
        reading = backend.read()
        state_bytes = workload.state_bytes()
    finally:
        batch = None
        workload.end_trial()
    gc.collect()
    backend.empty_cache()
    if user_error is not None:
        raise user_error
    if failure is not None:
        return Trial(
            batch_size=batch_size,
            fits=False,
            steps_run=done,
            failure="oom",
            error=failure,
            peak_rss_bytes=backend.read().peak_rss_bytes,
            wall_s=time.perf_counter() - started,
        )
    return Trial(
        batch_size=batch_size,
        fits=True,
        step_times_s=tuple(times),
        steps_run=done,
        peak_bytes=reading.peak_bytes,
        peak_allocated_bytes=reading.peak_allocated_bytes,
        peak_reserved_bytes=reading.peak_reserved_bytes,
        device_used_bytes=reading.device_used_bytes,
        device_total_bytes=reading.device_total_bytes,
        peak_rss_bytes=reading.peak_rss_bytes,
        state_bytes=state_bytes,
        wall_s=time.perf_counter() - started,
    )
