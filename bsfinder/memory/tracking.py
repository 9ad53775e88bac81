"""Live tensor bytes through one training step, op by op: the peak, its phase, the timeline.

A ``TorchDispatchMode`` sees every tensor an aten op returns; each new storage is counted
(with the size the target's allocator would hand out) until it is garbage collected. It
runs the same on real tensors (the profile's timeline) and on fake ones (the estimator),
so the estimate and the measurement count memory in one way.

Phases: ``forward`` (forward and loss), ``backward`` (while autograd runs a graph) and
``optimizer`` (from ``optimizer.step``, seen through torch's global step hooks, to the end).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["PHASES", "LiveBytes", "TimelinePoint", "tensor_bytes", "tensors_in"]

PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True)
class TimelinePoint:
    """Live bytes after one aten op."""

    op: int
    live_bytes: int
    phase: str


def tensors_in(obj: Any) -> Iterator[Any]:
    """Every tensor held by a tensor, module (parameters, buffers, gradients), optimizer
    (state), dict, list or tuple."""
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.is_leaf and obj.requires_grad and obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, torch.nn.Module):
        for t in obj.parameters():
            yield from tensors_in(t)
        yield from obj.buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from tensors_in(state)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from tensors_in(value)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor :func:`tensors_in` finds in ``obj``."""
    return sum(t.numel() * t.element_size() for t in tensors_in(obj))


class LiveBytes(TorchDispatchMode):
    """Counts live storages while active; ``peak_bytes`` and ``timeline`` after.

    Args:
        allocation_bytes: bytes the allocator reserves for a storage of ``n`` bytes (the
            identity by default; a target device's rounding for estimates).
        existing: objects whose tensors are live before the first op (model, optimizer,
            batch); see :func:`tensors_in`.
        on_op: called as ``on_op(func, args, out)`` after every aten op, its outputs counted.
    """

    def __init__(
        self,
        allocation_bytes: Callable[[int], int] | None = None,
        existing: Any = (),
        on_op: Callable[[Any, Any, Any], None] | None = None,
    ) -> None:
        super().__init__()
        self._on_op = on_op
        self._size = allocation_bytes or (lambda n: n)
        self._refs: dict[int, weakref.ref[Any]] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_phase = "forward"
        self.phase_peaks = dict.fromkeys(PHASES, 0)
        self.timeline: list[TimelinePoint] = []
        self._in_optimizer = False
        self._stepped = False
        self._hooks: list[Any] = []
        for t in tensors_in(existing):
            self._count(t)
        self.start_bytes = self.live_bytes
        self.peak_bytes = self.live_bytes

    # -- phases ------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        if self._in_optimizer:
            return "optimizer"
        if torch._C._current_graph_task_id() != -1:
            return "backward"
        # after the optimizer step (zero_grad, the loop's own ops) until the next backward
        return "optimizer" if self._stepped else "forward"

    def __enter__(self) -> LiveBytes:
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        def pre(*_: Any) -> None:
            self._in_optimizer = self._stepped = True

        def post(*_: Any) -> None:
            self._in_optimizer = False

        self._hooks = [
            register_optimizer_step_pre_hook(pre),
            register_optimizer_step_post_hook(post),
        ]
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- counting ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tensors_in(out if isinstance(out, list | tuple) else (out,)):
            self._count(t)
        if self._on_op is not None:
            self._on_op(func, args, out)
        phase = self.phase
        self.timeline.append(TimelinePoint(len(self.timeline), self.live_bytes, phase))
        if self.live_bytes > self.phase_peaks[phase]:
            self.phase_peaks[phase] = self.live_bytes
        return out

    def _count(self, t: Any) -> None:
        if t.is_sparse or t.layout != torch.strided:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without one storage
            return
        key = storage._cdata
        ref = self._refs.get(key)
        if ref is not None and ref() is not None:
            return
        size = self._size(storage.nbytes()) if storage.nbytes() else 0
        self._refs[key] = weakref.ref(storage, partial(self._free, key, size))
        self.live_bytes += size
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_phase = self.phase

    def _free(self, key: int, size: int, _ref: Any = None) -> None:
        self._refs.pop(key, None)
        self.live_bytes -= size
