"""A fake trial runner for logic tests: memory and step time follow formulas you give it.

It stands in for the whole runner (worker, trial, device), so the search and the probe run
without torch. ``FakeDevice`` is its old name, kept as a deprecated alias; a fake *device*
(a backend with a settable capacity) is :class:`bsfinder.devices.fake.FakeBackend`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from bsfinder.core.results import Trial
from bsfinder.errors import UserCodeError
from bsfinder.execution.runner import RunnerInfo, StepCallback

__all__ = ["FakeRunner"]

#: the DeprecationWarning of the old name
RENAMED = "FakeDevice is renamed FakeRunner: it fakes a trial runner, not a device"


class FakeRunner:
    """A :class:`~bsfinder.execution.runner.TrialRunner` with no torch: peak = a + k * b.

    A batch fits when its peak is within ``capacity_bytes``; the step takes
    ``step_time(b)`` seconds (default: 10 ms + 1 ms per sample, a device that never
    saturates); a trial's ``wall_s`` is ``setup_s`` plus its steps (simulated: nothing
    sleeps). A timed trial runs ``steps`` steps, an untimed one ``fit_steps``, of which the last
    is timed (one reading) when there are two or more.
    ``raise_at`` makes a batch raise a non-OOM error, like a buggy model.

    Example:
        >>> runner = FakeRunner(capacity_bytes=1000, fixed_bytes=100, per_sample_bytes=9)
        >>> runner.run_trial(100).fits, runner.run_trial(101).fits
        (True, False)
    """

    def __init__(
        self,
        *,
        capacity_bytes: int,
        fixed_bytes: int = 0,
        per_sample_bytes: int = 1,
        step_time: Callable[[int], float] | None = None,
        steps: int = 3,
        fit_steps: int = 2,
        setup_s: float = 0.0,
        raise_at: int | None = None,
        memory: Callable[[int], int] | None = None,
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self.memory = memory or (lambda b: fixed_bytes + per_sample_bytes * b)
        self.step_time = step_time or (lambda b: 0.010 + 0.001 * b)
        self.steps = steps
        self.fit_steps = fit_steps
        self.setup_s = setup_s
        self.raise_at = raise_at
        self.tried: list[int] = []

    def start(self) -> RunnerInfo:
        return RunnerInfo(
            capacity_bytes=self.capacity_bytes,
            device={"kind": "fake", "name": "fake", "total_bytes": self.capacity_bytes},
            trial_steps=(self.steps, self.fit_steps),
        )

    def run_trial(
        self, batch_size: int, on_step: StepCallback | None = None, *, timed: bool = True
    ) -> Trial:
        """One trial: ``steps`` timed steps, or (``timed`` False) ``fit_steps`` untimed."""
        self.tried.append(batch_size)
        if self.raise_at is not None and batch_size >= self.raise_at:
            raise UserCodeError(
                batch_size=batch_size, exc_type="ValueError", detail="shapes do not match"
            )
        peak = self.memory(batch_size)
        if peak > self.capacity_bytes:
            return Trial(
                batch_size=batch_size,
                fits=False,
                failure="oom",
                error=f"fake: {peak} bytes > capacity {self.capacity_bytes}",
                wall_s=self.setup_s,
            )
        count = self.steps if timed else self.fit_steps
        if on_step is not None:
            for i in range(count):
                on_step(i + 1, count)
        step = self.step_time(batch_size)
        return Trial(
            batch_size=batch_size,
            fits=True,
            step_times_s=(step,) * (self.steps if timed else min(1, self.fit_steps - 1)),
            steps_run=count,
            peak_bytes=peak,
            wall_s=self.setup_s + count * step,
        )

    def close(self) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"isolation": "fake", "trial_processes": 0}


def __getattr__(name: str) -> Any:
    """``FakeDevice``: the old name of :class:`FakeRunner`, with a DeprecationWarning."""
    if name == "FakeDevice":
        warnings.warn(RENAMED, DeprecationWarning, stacklevel=2)
        return FakeRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
