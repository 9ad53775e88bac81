"""The ranks' bsfinder processes agree: every rank runs each trial, and all take one outcome.

The ranks' messages are JSON, checked field by field (:mod:`bsfinder.execution.messages`);
nothing a peer sends is unpickled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any

from bsfinder.core.results import Trial
from bsfinder.errors import BsfinderError, WorkerError
from bsfinder.execution.distributed.group import flag_failure
from bsfinder.execution.distributed.launch import Control, DistContext
from bsfinder.execution.messages import (
    Interrupted,
    RankReady,
    RankTrial,
    WorkerFailed,
    encode_message,
    error_message,
    from_peer,
    from_wire,
    malformed,
    raise_error,
    to_wire,
)
from bsfinder.execution.runner import RunnerInfo, StepCallback

__all__ = ["DistributedRunner", "agree"]

#: failure kinds, most telling first: the agreed failure is the first one found
_FAILURE_ORDER = ("oom", "crash", "timeout", "peer")


class DistributedRunner:
    """A :class:`~bsfinder.execution.runner.TrialRunner` whose trials run on every rank at once.

    Wraps this rank's :class:`~bsfinder.execution.process.ProcessRunner`; every rank must call the
    same methods in the same order (the search is deterministic given the agreed trials).
    """

    def __init__(self, inner: Any, ctx: DistContext, control: Control) -> None:
        self.inner = inner
        self.ctx = ctx
        self.control = control
        self._round = 0

    def start(self) -> RunnerInfo:
        with _this_rank() as outcome:
            outcome.message = RankReady(asdict(self.inner.start()))
        gathered = self._gather(outcome.message, RankReady.tag)
        infos = [from_peer(RunnerInfo, m.info, r) for r, m in enumerate(gathered)]
        mine = infos[self.ctx.rank]
        capacities = [i.capacity_bytes for i in infos]
        failures = [(r, i.build_failure) for r, i in enumerate(infos) if i.build_failure]
        known = [c for c in capacities if c is not None]
        return replace(
            mine,
            capacity_bytes=min(known) if known else None,
            device={**infos[0].device, "ranks": [i.device for i in infos]},
            workload={
                **infos[0].workload,
                "distributed": {**self.ctx.describe(), "capacity_bytes": capacities},
            },
            build_failure=(f"rank {failures[0][0]}: {failures[0][1]}" if failures else None),
        )

    def run_trial(
        self, batch_size: int, on_step: StepCallback | None = None, *, timed: bool = True
    ) -> Trial:
        self._round += 1
        tag = f"{self.ctx.session}/{self._round}"
        with _this_rank() as outcome:
            trial = self.inner.run_trial(batch_size, on_step, timed=timed, tag=tag)
            outcome.message = RankTrial(asdict(trial))
        if not isinstance(outcome.message, RankTrial) or not trial.fits:
            # a trial process that died or hung could not tell the others itself
            flag_failure(self.control.store, self.ctx.session, tag, self.ctx.rank, "failed")
        gathered = self._gather(outcome.message, RankTrial.tag)
        trials = [from_peer(Trial, m.trial, r) for r, m in enumerate(gathered)]
        for rank, other in enumerate(trials):
            if other.batch_size != batch_size:
                raise malformed(rank, f"a trial at batch {other.batch_size}, not {batch_size}")
        agreed = agree(trials)
        if not agreed.fits and agreed.failure == "peer":  # no rank failed: they lost each other
            error = WorkerError(
                f"the ranks' trial processes lost each other at batch {batch_size}, though no "
                f"rank ran out of memory: {agreed.error}"
            )
            error.agreed = True
            raise error
        return agreed

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.control.close()

    def stats(self) -> dict[str, Any]:
        return {**self.inner.stats(), **self.ctx.describe(), "rounds": self._round}

    def _gather(self, message: Any, expected: str) -> list[Any]:
        """Every rank's message, each checked; the first error is raised on every rank."""
        try:
            data: Any = to_wire(message)
            encode_message(data)
        except (TypeError, ValueError) as exc:  # bsfinder's own bug: still meet the others
            data = to_wire(WorkerFailed(f"this rank's {message.tag!r} message is not JSON: {exc}"))
        gathered = [from_wire(m, r, expected) for r, m in enumerate(self.control.all_gather(data))]
        self._raise_first(gathered)
        return gathered

    def _raise_first(self, gathered: list[Any]) -> None:
        if any(isinstance(message, Interrupted) for message in gathered):
            raise KeyboardInterrupt  # a rank was stopped: all stop, keeping what was agreed
        for rank, message in enumerate(gathered):
            if not isinstance(message, RankReady | RankTrial):
                raise_error(rank, message)


class _RankMessage:
    """What this rank brings to the next all-gather (see :func:`_this_rank`)."""

    message: Any = WorkerFailed("no outcome")


@contextlib.contextmanager
def _this_rank() -> Iterator[_RankMessage]:
    """What this rank brings to the next all-gather, whatever happened: every rank must
    reach it, or the others wait in it until the timeout."""
    outcome = _RankMessage()
    try:
        yield outcome
    except BsfinderError as exc:
        outcome.message = error_message(exc)
    except KeyboardInterrupt:
        outcome.message = Interrupted()
    except Exception as exc:  # bsfinder's own failure (a callback, the worker's pipe)
        outcome.message = WorkerFailed(f"{type(exc).__name__}: {exc}")


def agree(per_rank: list[Trial]) -> Trial:
    """One trial from every rank's: it fits only if it fits on every rank.

    The step time of each step is the slowest rank's (the ranks wait for each other); the
    memory is the largest rank's; ``ranks`` keeps each rank's own readings. When it does not
    fit, the failure is the most telling rank's (an OOM before a crash before a rank that
    stopped because another failed), named with its rank.
    """
    if not per_rank:
        raise ValueError("no trials to agree on")
    batch = per_rank[0].batch_size
    summaries = tuple(
        {
            "rank": rank,
            "fits": t.fits,
            "step_s": t.step_s,
            "peak_bytes": t.peak_bytes,
            "peak_rss_bytes": t.peak_rss_bytes,
            "peak_reserved_bytes": t.peak_reserved_bytes,
            "state_bytes": t.state_bytes,
            "failure": t.failure,
            "error": t.error,
        }
        for rank, t in enumerate(per_rank)
    )

    def largest(name: str) -> Any:
        values = [getattr(t, name) for t in per_rank if getattr(t, name) is not None]
        return max(values) if values else None

    walls = [t.wall_s for t in per_rank if t.wall_s is not None]
    if all(t.fits for t in per_rank):
        lengths = {len(t.step_times_s) for t in per_rank}
        times: tuple[float, ...] = ()
        if len(lengths) == 1:
            steps = zip(*(t.step_times_s for t in per_rank), strict=True)
            times = tuple(max(step) for step in steps)
        return Trial(
            batch_size=batch,
            fits=True,
            step_times_s=times,
            steps_run=min(t.steps_run for t in per_rank),
            peak_bytes=largest("peak_bytes"),
            peak_allocated_bytes=largest("peak_allocated_bytes"),
            peak_reserved_bytes=largest("peak_reserved_bytes"),
            device_used_bytes=largest("device_used_bytes"),
            device_total_bytes=largest("device_total_bytes"),
            peak_rss_bytes=largest("peak_rss_bytes"),
            state_bytes=largest("state_bytes"),
            wall_s=max(walls) if walls else None,
            ranks=summaries,
        )
    failed = [(r, t) for r, t in enumerate(per_rank) if not t.fits]
    rank, worst = min(
        failed,
        key=lambda rt: (
            _FAILURE_ORDER.index(rt[1].failure)
            if rt[1].failure in _FAILURE_ORDER
            else len(_FAILURE_ORDER)
        ),
    )
    return Trial(
        batch_size=batch,
        fits=False,
        steps_run=min(t.steps_run for t in per_rank),
        failure=worst.failure,
        error=f"rank {rank}: {worst.error}",
        peak_rss_bytes=largest("peak_rss_bytes"),
        wall_s=max(walls) if walls else None,
        ranks=summaries,
    )
