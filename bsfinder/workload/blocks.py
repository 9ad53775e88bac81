"""The model's blocks: the repeated units FSDP shards one by one, and what each weighs.

Read from the module alone (no process group): the distributed runner wraps these units, and
the workload records their sizes so scale-out can plan sharded memory without a probe.
"""

from __future__ import annotations

from typing import Any

__all__ = ["fsdp_units", "unit_bytes"]


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
