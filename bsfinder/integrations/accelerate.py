"""Accelerate's ``find_executable_batch_size`` decorator, with bsfinder's exact answer.

Accelerate's decorator calls ``function(batch_size, ...)`` at ``starting_batch_size`` and,
on each out-of-memory error, again in the same process at 0.9 times the batch: memory a
failed attempt leaves behind lowers every later one, and the answer is wherever the
0.9 steps land. This decorator has the same calling convention::

    from bsfinder.integrations.accelerate import find_executable_batch_size

    @find_executable_batch_size(starting_batch_size=512, memory_limit="4GiB")
    def train(batch_size, model, optimizer):
        ...  # the whole training loop, at batch_size

    train(model, optimizer)  # probes, then trains once at the largest batch that fits

What a trial runs: ``function(batch_size, *args, **kwargs)`` in a fresh process (on
copies of the arguments: your objects are not touched), stopped by a private exception
once ``torch.optim.Optimizer.step`` has completed ``optimizer_steps`` times (counted by a
global step hook; steps skipped by a ``GradScaler`` or by gradient accumulation are not
counted, as they did not run). A function that returns before that, or that never steps
a ``torch.optim`` optimizer, is also fine: the trial then ran all of it. The search
(bsfinder's: grow, then bisect to the ``granularity``) never tries a batch above
``starting_batch_size``. Then ``function`` is called once, in this process, at the batch
found, and its return value is returned; ``train.result`` holds the probe's
:class:`~bsfinder.core.results.ProbeResult`.

Limits: everything the function does before its first optimizer steps (building the model,
``accelerator.prepare``, loading data) runs again in every trial, and is part of each
trial's time and memory (as it is of the real run). A trial's time is that of the whole
call, so ``result.time_optimal_batch`` is not a measure of the step. The arguments travel
to the trial processes by pickling (objects that cannot, such as an open file, make the
trials run in this process, with a warning); what a trial writes (checkpoints, logs) is
really written.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from bsfinder.core.results import ProbeResult
from bsfinder.errors import BsfinderError, SpecError
from bsfinder.options import BudgetOptions, ExecutionOptions, Granularity, SearchOptions
from bsfinder.probe import ProbeEvent

__all__ = ["DEFAULT_OPTIMIZER_STEPS", "FunctionTrial", "find_executable_batch_size"]

#: optimizer steps a trial runs before it is stopped: the first creates the optimizer's
#: state, the second meets the steady peak (bsfinder.workload.step.STEPS_TO_PEAK), a third
#: for a loop whose state appears later
DEFAULT_OPTIMIZER_STEPS = 3


def find_executable_batch_size(
    function: Callable[..., Any] | None = None,
    *,
    starting_batch_size: int = 128,
    memory_limit: int | str | None = BudgetOptions.memory_limit,
    device: str = ExecutionOptions.device,
    granularity: Granularity = SearchOptions.granularity,
    optimizer_steps: int = DEFAULT_OPTIMIZER_STEPS,
    isolation: str = ExecutionOptions.isolation,
    time_limit: float | str | None = SearchOptions.time_limit,
    trial_timeout_s: float | None = ExecutionOptions.trial_timeout_s,
    on_event: Callable[[ProbeEvent], None] | None = None,
) -> Any:
    """Decorate ``function(batch_size, ...)``: calling it finds the largest batch up to
    ``starting_batch_size`` that trains, in fresh processes, then runs it once at that batch.

    Args:
        function: the training function; its first parameter is the batch size, which the
            caller does not pass (as with Accelerate's decorator).
        starting_batch_size: the largest batch tried (Accelerate starts there and shrinks).
        memory_limit, device, granularity, isolation, time_limit, trial_timeout_s,
            on_event: as :func:`bsfinder.find_batch_size` (granularity ``1``: the exact
            largest batch; the default 8: a multiple of 8).
        optimizer_steps: optimizer steps a trial runs before it is stopped.

    Returns:
        The decorated function (or, without ``function``, a decorator). Its ``result``
        attribute is the last probe's result (None before the first call).

    Raises:
        SpecError: bad options, or the function called with its batch size (the decorator
            passes it).
        BsfinderError: no batch from 1 up fits (its ``result`` holds the trials).
        UserCodeError: the function raised something other than out-of-memory in a trial.

    Example:
        >>> @find_executable_batch_size(starting_batch_size=256)  # doctest: +SKIP
        ... def train(batch_size):
        ...     ...
        >>> train()  # doctest: +SKIP
    """
    if function is None:
        return functools.partial(
            find_executable_batch_size, starting_batch_size=starting_batch_size,
            memory_limit=memory_limit, device=device, granularity=granularity,
            optimizer_steps=optimizer_steps, isolation=isolation, time_limit=time_limit,
            trial_timeout_s=trial_timeout_s, on_event=on_event,
        )  # fmt: skip
    for name, value in (("starting_batch_size", starting_batch_size),
                        ("optimizer_steps", optimizer_steps)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SpecError(f"{name} must be a positive integer, got {value!r}")
    if not callable(function):
        raise SpecError(f"find_executable_batch_size decorates a function, got {function!r}")
    params = list(inspect.signature(function).parameters)
    if not params:
        raise SpecError(
            f"{_name(function)} takes no arguments; its first parameter must be the batch size"
        )

    @functools.wraps(function)
    def decorated(*args: Any, **kwargs: Any) -> Any:
        if len(params) < len(args) + 1 or params[0] in kwargs:
            raise SpecError(
                f"the batch size was passed to {_name(function)}: remove it, the decorator "
                f"passes it (call {_name(function)}(...) with the other arguments only)"
            )
        result = probe(*args, **kwargs)
        if result.max_batch is None:
            error = BsfinderError(_nothing_fits(function, result))
            error.result = result
            raise error
        return function(result.max_batch, *args, **kwargs)

    def probe(*args: Any, **kwargs: Any) -> ProbeResult:
        from bsfinder.api import find_batch_size

        result = find_batch_size(
            train_step=FunctionTrial(function, args, kwargs, optimizer_steps=optimizer_steps),
            device=device, memory_limit=memory_limit, max_batch=starting_batch_size,
            start_batch=1, granularity=granularity, warmup_steps=0, steps=1,
            isolation=isolation, time_limit=time_limit, trial_timeout_s=trial_timeout_s,
            on_event=on_event,
        )  # fmt: skip
        decorated.result = result  # type: ignore[attr-defined]
        return result

    decorated.result = None  # type: ignore[attr-defined]
    decorated.probe = probe  # type: ignore[attr-defined]
    return decorated


class _TrialDone(BaseException):
    """Stops the user's function once its trial has run its optimizer steps (a
    ``BaseException``: an ``except Exception`` in the user's loop lets it through)."""


class FunctionTrial:
    """One trial of a decorated function: ``function(batch_size, *args, **kwargs)`` until
    ``torch.optim.Optimizer.step`` has completed ``optimizer_steps`` times (or the function
    returns). Picklable when the function and its arguments are; made by
    :func:`find_executable_batch_size`.

    ``optimizer_steps_run`` is what the last call ran.
    """

    def __init__(
        self,
        function: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        optimizer_steps: int = DEFAULT_OPTIMIZER_STEPS,
    ) -> None:
        self.function = function
        self.args = args
        self.kwargs = dict(kwargs or {})
        self.optimizer_steps = optimizer_steps
        self.optimizer_steps_run = 0

    def __call__(self, batch_size: int) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.optimizer_steps_run = 0

        def count(optimizer: Any, args: Any, kwargs: Any) -> None:
            self.optimizer_steps_run += 1
            if self.optimizer_steps_run >= self.optimizer_steps:
                raise _TrialDone

        handle = register_optimizer_step_post_hook(count)
        try:
            self.function(batch_size, *self.args, **self.kwargs)
        except _TrialDone:
            pass  # the traceback (and the step's tensors it holds) goes with this block
        finally:
            handle.remove()


def _name(function: Callable[..., Any]) -> str:
    return getattr(function, "__name__", type(function).__name__)


def _nothing_fits(function: Callable[..., Any], result: ProbeResult) -> str:
    tried = ", ".join(f"{t.batch_size} {'✓' if t.fits else '✗'}" for t in result.trials)
    if result.partial:
        return (
            f"{_name(function)}: the time limit ended the probe before any batch fitted "
            f"(tried: {tried or 'none'}); give time_limit=None or more time"
        )
    return (
        f"{_name(function)} does not train at batch 1 under this budget (tried: {tried}): "
        "give more memory (memory_limit=), or make the model or its optimizer state smaller"
    )
