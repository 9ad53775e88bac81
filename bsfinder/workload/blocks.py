"""The model's blocks: the repeated units FSDP shards one by one and activation
checkpointing recomputes, and what each weighs.

Read from the module alone (no process group): the distributed runner wraps these units, and
the workload records their sizes so scale-out can plan sharded memory without a probe.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

__all__ = ["checkpoint_blocks", "fsdp_units", "unit_bytes"]


def fsdp_units(model: Any) -> list[Any]:
    """The submodules sharded one by one, before the root: the repeated blocks.

    The elements of every ``nn.ModuleList`` (transformer layers); without one, the root's
    children that hold parameters. Each unit's weights are gathered only while it runs.
    """
    import torch

    units: list[Any] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            units.extend(m for m in module if any(True for _ in m.parameters()))
    if not units:
        units = [m for m in model.children() if any(True for _ in m.parameters())]
    seen: set[int] = set()
    nested = {id(sub) for u in units for sub in u.modules() if sub is not u}
    unique = []
    for unit in units:  # a unit inside another unit is sharded with it
        if id(unit) not in seen and id(unit) not in nested:
            seen.add(id(unit))
            unique.append(unit)
    return unique


def unit_bytes(model: Any) -> tuple[int, int]:
    """Parameter bytes of the largest FSDP unit (what one all-gather materialises) and of
    the root's own parameters, those no unit holds (gathered through the whole step)."""

    def size(params: Any) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    units = fsdp_units(model)
    in_units = {id(p) for unit in units for p in unit.parameters()}
    root = size(p for p in model.parameters() if id(p) not in in_units)
    return max((size(unit.parameters()) for unit in units), default=0), root


def checkpoint_blocks(model: Any) -> tuple[int, Callable[[], None]]:
    """Activation checkpointing of the model's repeated blocks, in place: each block keeps
    only its inputs in the forward and runs again in the backward (non-reentrant
    ``torch.utils.checkpoint``, the form PyTorch recommends). Returns how many blocks, and
    a function that puts the model back as it was.

    A Hugging Face model uses its own switch (``activation_checkpointing_enable``, or
    ``gradient_checkpointing_enable`` before transformers 5), which also turns the
    key/value cache off as its training loop does; any other model has the blocks of
    :func:`fsdp_units` wrapped (the elements of its ``nn.ModuleList``; without one, the
    root's children with parameters), as ``checkpoint_wrapper`` would, without renaming
    its parameters.
    """
    if getattr(model, "supports_gradient_checkpointing", False):

        def count() -> int:  # the layers that run checkpointed, not their containers
            try:
                from transformers.modeling_layers import GradientCheckpointingLayer
            except ImportError:  # before transformers 4.52: the flag is on the stacks
                return sum(1 for m in model.modules() if getattr(m, "gradient_checkpointing", 0))
            layers = (m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
            return sum(1 for m in layers if m.gradient_checkpointing)

        on = getattr(type(model), "is_activation_checkpointing", None)  # transformers 5
        flag = "is_activation_checkpointing" if on is not None else "is_gradient_checkpointing"
        if getattr(model, flag, False):  # the user's own, kept
            return count(), lambda: None
        enable = getattr(model, "activation_checkpointing_enable", None)
        disable = getattr(model, "activation_checkpointing_disable", None)
        kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
        if enable is None or disable is None:
            enable = model.gradient_checkpointing_enable
            disable = model.gradient_checkpointing_disable
            kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        enable(**kwargs)
        return count(), disable
    units = fsdp_units(model)
    saved = [(unit, unit.__dict__.get("forward")) for unit in units]
    for unit in units:
        # bound to the unit, so that a deep copy of the model binds it to the copy
        unit.forward = types.MethodType(_checkpointed_forward, unit)

    def undo() -> None:
        for unit, forward in saved:
            if forward is None:
                unit.__dict__.pop("forward", None)
            else:
                unit.forward = forward

    return len(units), undo


def _checkpointed_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    import torch.utils.checkpoint

    forward = type(self).forward.__get__(self)  # the class's: the instance's is this one
    if not torch.is_grad_enabled():  # eval: nothing is kept, nothing to recompute
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
