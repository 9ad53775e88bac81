"""Run trials in this process, with the user's own objects, and leave them as found.

Used when the workload cannot travel to a worker (a closure, a class defined in
``__main__``) or when asked. A failed trial can leave memory held in this process, so later
trials may report less than a fresh process could do; the result says so.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from typing import Any

from bsfinder.devices.base import backend_for
from bsfinder.errors import UserCodeError, describe_oom
from bsfinder.profiling import MemoryProfile, profile_does_not_fit, profile_step
from bsfinder.results import Trial
from bsfinder.runner import RunnerInfo, StepCallback
from bsfinder.trial import execute_trial
from bsfinder.workload import Workload, WorkloadSpec

__all__ = ["InlineRunner", "UserStateGuard"]


class UserStateGuard:
    """Snapshot of a model, an optimizer and the RNGs, restored bit for bit by ``restore``.

    Saves weights and buffers (copied to CPU), gradients, ``requires_grad``, each module's
    train/eval mode, the optimizer's state dict and the values and gradients of every
    parameter it updates (a ``train_step`` may train weights no ``model`` names), and the
    Python, NumPy, torch CPU and CUDA random states.
    """

    def __init__(self, model: Any = None, optimizer: Any = None) -> None:
        import copy

        import torch

        self.model = model
        self.optimizer = optimizer
        self._state = None
        self._grads: list[Any] = []
        self._requires_grad: list[bool] = []
        self._modes: list[bool] = []
        if model is not None:
            self._state = {
                k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
            }
            params = list(model.parameters())
            self._grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
            self._requires_grad = [p.requires_grad for p in params]
            self._modes = [m.training for m in model.modules()]
        self._optimizer_state = copy.deepcopy(optimizer.state_dict()) if optimizer else None
        self._optimizer_params = [
            p for group in (optimizer.param_groups if optimizer else ()) for p in group["params"]
        ]
        self._optimizer_values = [
            (p.detach().to("cpu", copy=True), None if p.grad is None else p.grad.detach().clone())
            for p in self._optimizer_params
        ]
        self._python_rng = random.getstate()
        numpy = sys.modules.get("numpy")
        self._numpy_rng = numpy.random.get_state() if numpy is not None else None
        self._torch_rng = torch.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        """Put everything back as it was when the guard was made."""
        import torch

        if self.model is not None and self._state is not None:
            with torch.no_grad():
                self.model.load_state_dict(self._state)
            for p, grad, flag in zip(
                self.model.parameters(), self._grads, self._requires_grad, strict=True
            ):
                p.grad = grad
                p.requires_grad_(flag)
            for m, mode in zip(self.model.modules(), self._modes, strict=True):
                m.training = mode
        with torch.no_grad():
            for p, (value, grad) in zip(
                self._optimizer_params, self._optimizer_values, strict=True
            ):
                p.copy_(value)
                p.grad = grad
        if self.optimizer is not None and self._optimizer_state is not None:
            self.optimizer.load_state_dict(self._optimizer_state)
        random.setstate(self._python_rng)
        numpy = sys.modules.get("numpy")
        if numpy is not None and self._numpy_rng is not None:
            numpy.random.set_state(self._numpy_rng)
        torch.set_rng_state(self._torch_rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)


class InlineRunner:
    """A :class:`~bsfinder.runner.TrialRunner` that runs trials in this process.

    ``model`` is trained directly (weights restored after); ``factory`` builds a model under
    the budget; ``guard_model``/``guard_optimizer`` are restored after the probe (the objects a
    user's ``train_step`` mutates).
    """

    def __init__(
        self,
        spec: WorkloadSpec,
        *,
        device: str,
        budget_bytes: int | None,
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
        self.budget_bytes = budget_bytes
        self.warmup_steps = warmup_steps
        self.steps = steps
        self.reason = reason
        self._guard_model = guard_model
        self._guard_optimizer = guard_optimizer
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
        self._guard = UserStateGuard(self._guard_model, self._guard_optimizer)
        build_failure = None
        try:
            self._workload.load()
            self._workload.rehearse()
            self._workload.warm_up()
            capacity = self._backend.apply_budget(self.budget_bytes)
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
        return RunnerInfo(
            capacity_bytes=capacity,
            device=self._backend.describe(),
            workload={
                **self.spec.describe(),
                "isolation": "inline",
                "warmup_steps": self.warmup_steps,
                "steps": self.steps,
                **({} if build_failure else self._workload.parameter_stats()),
            },
            notes=(note,),
            build_failure=build_failure,
        )

    def run_trial(self, batch_size: int, on_step: StepCallback | None = None) -> Trial:
        return execute_trial(
            self._workload,
            self._backend,
            batch_size,
            warmup_steps=self.warmup_steps,
            steps=self.steps,
            on_step=on_step,
        )

    def run_profile(self, batch_size: int, snapshot: str | None = None) -> MemoryProfile:
        """Profile one step at ``batch_size`` in this process (see :mod:`bsfinder.profiling`)."""
        try:
            return profile_step(self._workload, self._backend, batch_size, snapshot=snapshot)
        except Exception as exc:
            reason = describe_oom(exc, under_memory_limit=self._backend.under_limit)
            if reason is None:
                raise UserCodeError.from_exception(exc, batch_size=batch_size) from None
        raise profile_does_not_fit(batch_size, reason)

    def stats(self) -> dict[str, Any]:
        return {"isolation": "inline", "trial_processes": 0}

    def close(self) -> None:
        self._backend.release_budget()
        if self._guard is not None:
            self._guard.restore()
            self._guard = None
