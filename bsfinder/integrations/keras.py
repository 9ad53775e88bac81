"""The batch a compiled Keras 3 model (torch backend) can train with in ``model.fit``.

:func:`find_fit_batch_size` probes the model with Keras's own training step: each trial
runs ``model.fit`` itself on :data:`FIT_BATCHES` batches of real samples of ``x`` and
``y`` per step (its data adapter, callbacks and ``train_function``: forward, the loss,
metrics and optimizer from ``model.compile``, backward, the optimizer's update), in a fresh
process on a copy of the model, through :func:`bsfinder.find_batch_size` with
``train_step=``. The answer, ``result.max_batch``, is a batch
``model.fit(x, y, batch_size=...)`` trains with under the same budget::

    result = find_fit_batch_size(model, x, y, memory_limit="4GiB")
    model.fit(x, y, batch_size=result.max_batch, epochs=10)

What a trial holds: a copy of the model (Keras's own pickling: its config, weights and
compile settings; the optimizer's state is created at the first step, as in ``fit``), up to
:data:`POOL_SAMPLES` samples of ``x`` and ``y``, and the batch built from them (the pool
repeated when the batch is larger). The rest of ``x`` is data, not training memory: it is
not sent to the trials, and a budget for ``fit`` must leave room for the data set the
process holds.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from bsfinder.core.results import ProbeResult, Trial
from bsfinder.errors import SpecError
from bsfinder.options import (
    BudgetOptions,
    ExecutionOptions,
    Granularity,
    RecommendOptions,
    SearchOptions,
)
from bsfinder.probe import ProbeEvent

__all__ = ["FIT_BATCHES", "POOL_SAMPLES", "KerasStep", "check_fit", "find_fit_batch_size"]

#: the most samples of ``x`` (and ``y``) a trial holds; larger batches repeat them
POOL_SAMPLES = 1024
#: batches per ``fit`` call in a trial step (and in :func:`check_fit`'s epoch): from the
#: second batch on, ``fit`` builds the next batch while the previous one is still held, a
#: batch of inputs one batch of ``fit`` never holds. Measured (Keras 3.15.1, torch 2.13 CPU,
#: the Dense(4096) model of tests/test_integration_keras.py, batch 5056, warm-up + 1 step):
#: peak 253.1 MiB at 1 batch per call, 255.7 at 2, 257.0 at 3; each batch past the second
#: adds only its own samples (1.3 MiB), which is data set, not training memory.
FIT_BATCHES = 2


def find_fit_batch_size(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    sample_weight: Any = None,
    memory_limit: int | str | None = BudgetOptions.memory_limit,
    device: str = ExecutionOptions.device,
    max_batch: int | None = SearchOptions.max_batch,
    start_batch: int = SearchOptions.start_batch,
    granularity: Granularity = SearchOptions.granularity,
    headroom: float = RecommendOptions.headroom,
    warmup_steps: int = ExecutionOptions.warmup_steps,
    steps: int = ExecutionOptions.steps,
    isolation: str = ExecutionOptions.isolation,
    time_limit: float | str | None = SearchOptions.time_limit,
    trial_timeout_s: float | None = ExecutionOptions.trial_timeout_s,
    on_event: Callable[[ProbeEvent], None] | None = None,
) -> ProbeResult:
    """The largest batch ``model.fit(x, y, batch_size=...)`` trains with, by Keras's own step.

    Each trial runs warm-up + timed steps, each ``model.fit`` for one epoch of
    :data:`FIT_BATCHES` batches of real samples of ``x``/``y`` (with the loss, optimizer and
    metrics of ``model.compile``), in a fresh process on a copy of ``model``; the user's
    model and its optimizer are not stepped. A step's time includes ``fit``'s set-up of an
    epoch (its data adapter and callbacks), which a real ``fit`` pays once per epoch: small
    batches' samples/s are understated, and ``time_optimal_batch`` leans large. Step times
    are per batch (a call's time over :data:`FIT_BATCHES`). No batch larger than ``len(x)``
    is tried: ``fit`` never makes one.

    Args:
        model: a compiled ``keras.Model`` on the torch backend (``KERAS_BACKEND=torch``).
        x: the inputs, as for ``fit``: an array or tensor, or a list/tuple/dict of them.
        y: the targets, as for ``fit`` (None when the model's loss needs none).
        sample_weight: per-sample weights, as for ``fit``.
        memory_limit, device, max_batch, start_batch, granularity, headroom,
            warmup_steps, steps, isolation, time_limit, trial_timeout_s, on_event: as
            :func:`bsfinder.find_batch_size`.

    Returns:
        bsfinder's :class:`~bsfinder.core.results.ProbeResult`: ``max_batch`` for ``fit``,
        ``safe_batch`` with headroom, ``time_optimal_batch`` by Keras's own step time.

    Raises:
        SpecError: Keras is not on the torch backend, the model is not compiled, or ``x``/
            ``y`` are not arrays (a ``tf.data.Dataset``, a generator or a ``PyDataset``:
            pass arrays of some samples instead).

    Example:
        >>> result = find_fit_batch_size(model, x, y, memory_limit="2GiB")  # doctest: +SKIP
        >>> model.fit(x, y, batch_size=result.max_batch)  # doctest: +SKIP
    """
    from bsfinder.api import find_batch_size

    step = _fit_step(model, x, y, sample_weight, fit_steps=FIT_BATCHES)
    samples = _samples(x, "x")
    largest = samples if max_batch is None else min(max_batch, samples)
    with _torch_backend_for_workers():
        return find_batch_size(
            train_step=step, device=device, memory_limit=memory_limit, max_batch=largest,
            start_batch=min(start_batch, largest), granularity=granularity, headroom=headroom,
            warmup_steps=warmup_steps, steps=steps, isolation=isolation, time_limit=time_limit,
            trial_timeout_s=trial_timeout_s, on_event=on_event,
        )  # fmt: skip


class KerasStep:
    """One Keras training step at a batch size, as ``model.fit`` runs it: ``model.fit`` for
    one epoch of ``fit_steps`` batches of ``batch_size`` samples of the pool (repeated when
    the batch is larger than the pool), ``shuffle=False``, ``verbose=0``.

    ``fit`` itself, not ``train_on_batch``: measured (Keras 3.15, torch 2.13, the Dense
    model of tests/test_integration_keras.py), a second ``fit`` call peaks 7-8 MiB above
    ``train_on_batch``'s steady peak at every batch, enough to move the edge under 256 MiB
    by ~170 samples. Picklable: the model travels by Keras's own pickling (config, weights,
    compile settings), the arrays as arrays. Made by
    :func:`find_fit_batch_size` (:data:`FIT_BATCHES` per call) and :func:`check_fit` (a
    whole epoch).
    """

    def __init__(
        self, model: Any, x: Any, y: Any = None, sample_weight: Any = None, *, fit_steps: int = 1
    ) -> None:
        self.model = model
        self.x = x
        self.y = y
        self.sample_weight = sample_weight
        self.fit_steps = fit_steps
        #: the probe's step times are per batch (see bsfinder.workload.step.batches_per_call)
        self.batches_per_call = fit_steps

    def __call__(self, batch_size: int) -> None:
        total = batch_size * self.fit_steps
        x = _take(self.x, total)
        y = None if self.y is None else _take(self.y, total)
        weights = None if self.sample_weight is None else _take(self.sample_weight, total)
        self.model.fit(
            x, y, sample_weight=weights, batch_size=batch_size, epochs=1, shuffle=False,
            verbose=0,
        )  # fmt: skip


def check_fit(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    batch_size: int,
    memory_limit: int | str | None = BudgetOptions.memory_limit,
    device: str = "cpu",
    steps: int = FIT_BATCHES,
) -> Trial:
    """Does ``model.fit(x, y, batch_size=batch_size)`` train in a brand-new process under
    ``memory_limit``? One epoch of ``steps`` batches (the samples of ``x`` repeated as
    needed), in a new worker with one trial process, on a copy of the model.

    The independent check of :func:`find_fit_batch_size`'s answer: a whole epoch of
    batches in one ``fit`` call, as the probe's steps are (:data:`FIT_BATCHES` each) but in a
    new worker, one call, no warm-up call before it.

    Returns:
        The :class:`~bsfinder.core.results.Trial`: ``fits``, and ``error`` when it did not.

    Raises:
        SpecError: as :func:`find_fit_batch_size`.
    """
    from bsfinder.execution.placement import _by_value
    from bsfinder.execution.process import check_batch
    from bsfinder.options import size_bytes
    from bsfinder.workload.step import WorkloadSpec

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise SpecError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise SpecError(f"steps must be a positive integer, got {steps!r}")
    step = _fit_step(model, x, y, None, fit_steps=steps)
    budget = size_bytes(memory_limit, "memory limit")
    if budget is None and device == "cpu":
        raise SpecError("give the memory budget the batch was found under (memory_limit=)")
    blob, why = _by_value(step)
    if blob is None:
        raise SpecError(f"the model cannot travel to a fresh process: the step {why}")
    with _torch_backend_for_workers():
        # the whole epoch is one call of the step: no warm-up call before it
        return check_batch(
            WorkloadSpec(train_step=blob), batch_size, device=device,
            memory_limit_bytes=budget, warmup_steps=0, steps=1,
        )  # fmt: skip


def _fit_step(model: Any, x: Any, y: Any, sample_weight: Any, *, fit_steps: int = 1) -> KerasStep:
    """The step for ``model`` and a pool of samples of ``x``/``y``, checked: Keras on the
    torch backend, the model compiled and built, the arrays of one length."""
    keras = _keras()
    if not isinstance(model, keras.Model):
        raise SpecError(f"model must be a keras.Model, got {type(model).__name__}")
    if not model.compiled:
        raise SpecError(
            "the Keras model is not compiled: call model.compile(optimizer=..., loss=...) "
            "first; bsfinder trains with its loss, optimizer and metrics"
        )
    if not model.built:
        raise SpecError(
            "the Keras model is not built: give it an input shape (keras.Input(...)) or call "
            "it on a batch first, so that a copy of it can be made"
        )
    samples = _samples(x, "x")
    if samples < 1:
        raise SpecError("x has no samples")
    for name, value in (("y", y), ("sample_weight", sample_weight)):
        if value is not None and _samples(value, name) != samples:
            raise SpecError(
                f"x has {samples} samples but {name} has {_samples(value, name)}: they must "
                "match, as for model.fit"
            )
    pool = min(samples, POOL_SAMPLES)
    parts = [None if v is None else _head(v, pool) for v in (x, y, sample_weight)]
    return KerasStep(model, *parts, fit_steps=fit_steps)


def _keras() -> Any:
    """Keras 3, on the torch backend (else a SpecError saying how)."""
    wanted = os.environ.get("KERAS_BACKEND")
    if "keras" not in sys.modules and wanted not in (None, "torch"):
        raise SpecError(_backend_message(wanted))
    try:
        import keras
    except ImportError as exc:
        raise SpecError(
            f"Keras 3 is needed (pip install keras) with KERAS_BACKEND=torch: {exc}"
        ) from None
    backend = keras.backend.backend()
    if backend != "torch":
        raise SpecError(_backend_message(backend))
    return keras


def _backend_message(backend: str) -> str:
    return (
        f"Keras runs on the {backend!r} backend; bsfinder probes PyTorch: set "
        "KERAS_BACKEND=torch before Keras is imported (os.environ['KERAS_BACKEND'] = 'torch' "
        "at the top of the script, or in the shell)"
    )


@contextlib.contextmanager
def _torch_backend_for_workers() -> Iterator[None]:
    """``KERAS_BACKEND=torch`` in the environment the trial processes inherit (Keras here
    may have taken its backend from ``~/.keras/keras.json``); restored afterwards."""
    before = os.environ.get("KERAS_BACKEND")
    os.environ["KERAS_BACKEND"] = "torch"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("KERAS_BACKEND", None)
        else:
            os.environ["KERAS_BACKEND"] = before


def _leaves(data: Any) -> list[Any]:
    if isinstance(data, dict):
        return [leaf for value in data.values() for leaf in _leaves(value)]
    if isinstance(data, list | tuple):
        return [leaf for value in data for leaf in _leaves(value)]
    return [data]


def _samples(data: Any, name: str) -> int:
    """The number of samples of ``data`` (every array in it must have that many)."""
    counts = set()
    for leaf in _leaves(data):
        shape = getattr(leaf, "shape", None)
        if shape is None or len(shape) == 0 or not hasattr(leaf, "__getitem__"):
            raise SpecError(
                f"{name} must be an array or tensor (or a list, tuple or dict of them), got "
                f"{type(leaf).__name__}; a data set, generator or PyDataset cannot be sliced "
                "into batches: pass arrays of some of its samples (a few hundred are enough)"
            )
        counts.add(int(shape[0]))
    if len(counts) != 1:
        raise SpecError(f"the arrays of {name} have different numbers of samples: {counts}")
    return counts.pop()


def _map(data: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(data, dict):
        return {key: _map(value, fn) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return type(data)(_map(value, fn) for value in data)
    return fn(data)


def _head(data: Any, count: int) -> Any:
    """The first ``count`` samples, copied (a view would take the whole array along)."""

    def head(leaf: Any) -> Any:
        part = leaf[:count]
        return part.clone() if hasattr(part, "clone") else part.copy()

    return _map(data, head)


def _take(data: Any, batch_size: int) -> Any:
    """``batch_size`` samples of the pool, in order, repeated as needed."""

    def take(leaf: Any) -> Any:
        count = int(leaf.shape[0])
        if batch_size <= count:
            return leaf[:batch_size]
        if hasattr(leaf, "clone"):  # a torch tensor
            import torch

            return leaf[torch.arange(batch_size, device=leaf.device) % count]
        import numpy as np

        return np.resize(leaf, (batch_size, *leaf.shape[1:]))

    return _map(data, take)
