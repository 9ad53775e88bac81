"""Run trials in this process, with the user's own objects, and leave them as found.

Used when the workload cannot travel to a worker (a closure, a class defined in
``__main__``) or when asked. A failed trial can leave memory held in this process, so later
trials may report less than a fresh process could do; the result says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bsfinder.core.results import Trial
from bsfinder.devices.select import backend_for
from bsfinder.errors import UserCodeError, describe_oom
from bsfinder.execution.runner import RunnerInfo, StepCallback, describe_workload
from bsfinder.execution.trial import execute_trial, oom_or_model_error
from bsfinder.memory.profile import MemoryProfile, profile_does_not_fit, profile_step
from bsfinder.workload.state import UserStateGuard, reachable_state
from bsfinder.workload.step import Workload, WorkloadSpec, trial_recipe

__all__ = ["InlineRunner"]


class InlineRunner:
    """A :class:`~bsfinder.execution.runner.TrialRunner` that runs trials in this process.

    ``model`` is trained directly (weights restored after); ``factory`` builds a model under
    the budget; ``guard_model``/``guard_optimizer`` are restored after the probe, and so is
    every module, optimizer, LR scheduler and GradScaler that :func:`reachable_state` finds
    from ``train_step``, ``make_batch`` and ``factory`` (the objects a user's step mutates:
    BatchNorm statistics of a model no ``model=`` names).
    """

    def __init__(
        self,
        spec: WorkloadSpec,
        *,
        device: str,
        memory_limit_bytes: int | None,
        warmup_steps: int,
        steps: int,
        model: Any = None,
        factory: Callable[..., Any] | None = None,
        make_batch: Callable[[int], Any] | None = None,
        train_step: Callable[[int], Any] | None = None,
        guard_model: Any = None,
        guard_optimizer: Any = None,
        reason: str = "",
    ) -> None:
        self.spec = spec
        self.device = device
        self.memory_limit_bytes = memory_limit_bytes
        self.warmup_steps = warmup_steps
        self.steps = steps
        self.reason = reason
        self._guard_model = guard_model
        self._guard_optimizer = guard_optimizer
        self._reach_from = (train_step, make_batch, factory)
        self._workload = Workload(
            spec,
            device,
            model=model,
            factory=factory,
            make_batch=make_batch,
            train_step=train_step,
        )
        self._backend = backend_for(device, in_process=True)
        self._guard: UserStateGuard | None = None

    def start(self) -> RunnerInfo:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.init()  # so that the guard saves the CUDA RNG the trials will use
        modules, optimizers, others = reachable_state(self._reach_from)
        self._guard = UserStateGuard(
            self._guard_model,
            self._guard_optimizer,
            modules=modules,
            optimizers=optimizers,
            others=others,
        )
        build_failure = None
        try:
            self._workload.load()
            self._workload.rehearse()
            self._workload.warm_up()
            capacity = self._backend.apply_budget(self.memory_limit_bytes)
            try:
                self._workload.build()
            except Exception as exc:
                build_failure = describe_oom(exc, under_memory_limit=self._backend.under_limit)
                if build_failure is None:
                    raise
        except BaseException:
            self.close()
            raise
        note = (
            "trials ran in this process"
            + (f" ({self.reason})" if self.reason else "")
            + ": a failed trial can leave memory held here, so the largest batch may be "
            "lower than a fresh training process can do"
        )
        notes = [note]
        if self._guard.lazy:
            notes.append(
                f"{len(self._guard.lazy)} module(s) with lazy parameters that the train_step "
                "reaches were initialised by the probe: their state is not restored"
            )
        return RunnerInfo(
            capacity_bytes=capacity,
            device=self._backend.describe(),
            workload=describe_workload(
                self.spec,
                isolation="inline",
                warmup_steps=self.warmup_steps,
                steps=self.steps,
                more={
                    "restored_after_probe": {
                        "modules": len(self._guard.modules),
                        "optimizers": len(self._guard.optimizers),
                        "others": sorted({type(o).__name__ for o in self._guard.others}),
                    },
                    **({} if build_failure else self._workload.parameter_stats()),
                },
            ),
            notes=tuple(notes),
            build_failure=build_failure,
            trial_steps=(sum(self._recipe(timed=True)), sum(self._recipe(timed=False))),
        )

    def run_trial(
        self, batch_size: int, on_step: StepCallback | None = None, *, timed: bool = True
    ) -> Trial:
        warmup_steps, steps = self._recipe(timed=timed)
        return execute_trial(
            self._workload,
            self._backend,
            batch_size,
            warmup_steps=warmup_steps,
            steps=steps,
            on_step=on_step,
        )

    def _recipe(self, *, timed: bool) -> tuple[int, int]:
        return trial_recipe(
            self.warmup_steps,
            self.steps,
            timed=timed,
            user_step=self._workload.has_train_step,
        )

    def run_profile(self, batch_size: int, snapshot: str | None = None) -> MemoryProfile:
        """Profile one step at ``batch_size`` in this process (:mod:`bsfinder.memory.profile`)."""
        try:
            return profile_step(self._workload, self._backend, batch_size, snapshot=snapshot)
        except Exception as exc:
            outcome = oom_or_model_error(
                exc, under_memory_limit=self._backend.under_limit, batch_size=batch_size
            )
            if isinstance(outcome, UserCodeError):
                raise outcome from None
        raise profile_does_not_fit(batch_size, outcome)

    def stats(self) -> dict[str, Any]:
        return {"isolation": "inline", "trial_processes": 0}

    def close(self) -> None:
        self._backend.release_budget()
        self._workload.restore_model()
        if self._guard is not None:
            self._guard.restore()
            self._guard = None
