"""The seam between the probe and whatever runs trials: a worker, this process, or a fake."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bsfinder.core.results import Trial

__all__ = ["RunnerInfo", "StepCallback", "TrialRunner", "describe_workload"]

#: called with (steps done, steps total) during a trial
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class RunnerInfo:
    """What a runner reports once it is ready to run trials.

    ``build_failure`` says why the model itself did not fit (weights, before any step): then
    no trial can run, and the probe reports that instead of inventing failed trials.
    """

    capacity_bytes: int | None
    device: dict[str, Any] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    build_failure: str | None = None
    #: what set a default budget ("90% of the available RAM"); None: given, or not a CPU's
    budget_source: str | None = None
    #: steps of a timed trial (warm-up + timed) and of an untimed one (to the peak)
    trial_steps: tuple[int, int] = (4, 2)


def describe_workload(
    spec: Any,
    *,
    isolation: str,
    warmup_steps: int,
    steps: int,
    more: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a result records about the workload (:attr:`RunnerInfo.workload`): the spec's
    own description (``WorkloadSpec.describe``), how its trials ran, then what the runner
    adds (``more``: the built model's sizes, the allocator's settings). Under torchrun the
    distributed runner adds ``distributed``, and the probe its search settings."""
    return {
        **spec.describe(),
        "isolation": isolation,
        "warmup_steps": warmup_steps,
        "steps": steps,
        **(more or {}),
    }


class TrialRunner(Protocol):
    """Runs trials of one workload on one device."""

    def start(self) -> RunnerInfo:
        """Prepare (start the worker, build the model) and describe the device."""
        ...

    def run_trial(
        self, batch_size: int, on_step: StepCallback | None = None, *, timed: bool = True
    ) -> Trial:
        """Run warm-up + timed steps at ``batch_size`` (``timed`` False: only the steps to
        the steady-state peak, untimed, to see whether it fits); an OOM is a Trial with
        fits=False.

        Raises:
            UserCodeError: the model raised something other than an allocation failure.
        """
        ...

    def close(self) -> None:
        """Release the worker or restore the user's objects."""
        ...

    def stats(self) -> dict[str, Any]:
        """How trials were run: isolation, worker starts and their seconds."""
        ...
