"""Plain-text rendering of a memory estimate, a sequence frontier and a what-if table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from bsfinder.memory.estimate import MemoryEstimate
from bsfinder.options import RecommendOptions
from bsfinder.units import format_bytes

if TYPE_CHECKING:
    from bsfinder.api import FrontierPoint, WhatIfRow

__all__ = ["render_estimate", "render_frontier", "render_what_if"]


def render_estimate(estimate: MemoryEstimate, *, rows: int = 12) -> str:
    """The estimated peak per batch, the largest batch for the target, and the blind spots."""
    target = estimate.target
    memory = target.get("memory_bytes")
    where = f"{target['kind']}" + (f" with {format_bytes(memory)}" if memory else "")
    if target.get("card"):
        where = f"{target['card_label']} ({target['card']}: {format_bytes(memory)} usable)"
    state = estimate.state_bytes
    lines = [
        f"estimate for {where} (fake tensors, {len(estimate.points)} steps traced in "
        f"{estimate.seconds:.1f} s)",
        f"  weights {format_bytes(state['weights'])}, gradients "
        f"{format_bytes(state['gradients'])}, optimizer state "
        f"{format_bytes(state['optimizer_state'])}",
    ]
    if estimate.per_sample_bytes is not None:
        lines.append(f"  per sample: {format_bytes(int(estimate.per_sample_bytes))}")
    lines += [
        "",
        f"  {'batch':>7}  {'tensors':>10}  {'+ in kernel':>11}  {'+ outside':>10}  "
        f"{'peak':>10}  phase",
    ]
    shown = estimate.points if len(estimate.points) <= rows else estimate.points[-rows:]
    for p in shown:
        mark = "" if p.fits is None else ("  fits" if p.fits else "  does not fit")
        lines.append(
            f"  {p.batch_size:>7}  {format_bytes(p.tensor_peak_bytes):>10}  "
            f"{format_bytes(p.kernel_scratch_bytes):>11}  "
            f"{format_bytes(p.outside_tensors_bytes):>10}  {format_bytes(p.peak_bytes):>10}  "
            f"{p.peak_phase}{mark}"
        )
    if memory:
        lines.append("")
        if estimate.max_batch is None:
            lines.append(f"nothing fits in {format_bytes(memory)}, not even batch 1")
        else:
            limit = (
                f" ({estimate.first_failure} does not)" if estimate.first_failure else " (limit)"
            )
            lines.append(f"largest batch that fits: {estimate.max_batch}{limit}")
            safe = estimate.safe_batch
            if safe is not None and estimate.headroom:
                peak = estimate.point(safe).peak_bytes
                lines.append(
                    f"safe ({estimate.headroom:.0%} headroom)  : {safe}   (peak "
                    f"{format_bytes(peak)}, {peak / memory:.0%} of {format_bytes(memory)})"
                )
    lines += ["", "not seen by the estimate:"]
    lines += [f"  - {item}" for item in estimate.unseen]
    return "\n".join(lines)


def render_what_if(
    rows: Sequence[WhatIfRow],
    *,
    target: str,
    target_memory: str | None,
    ranks: int,
    given: dict[str, str] | None = None,
) -> str:
    """The what-if table: a line per precision and checkpointing, the as-given one marked."""
    from bsfinder.devices.cards import CARDS

    preset = CARDS.get(target)
    where = (
        f"{preset.label} ({target}: {format_bytes(preset.usable_bytes)} usable)"
        if preset is not None
        else f"{target} with {target_memory}"
    )
    given = given or {}

    def cell(value: int | None) -> str:
        return "none" if value is None else str(value)

    lines = [
        f"what if, on {where}: the largest batch (safe: {RecommendOptions.headroom:.0%} "
        f"headroom), and per rank over "
        f"{ranks} ranks",
        "",
        f"  {'precision':<11} {'checkpointing':<14} {'largest':>8} {'safe':>6} "
        f"{'peak':>10} {'state':>10} {f'DDP x{ranks}':>8} {f'FSDP x{ranks}':>9}",
    ]
    for r in rows:
        mark = (
            "  <- as given"
            if (r.precision, r.checkpointing)
            == (given.get("precision", "32"), given.get("checkpointing", "none"))
            else ""
        )
        if r.error is not None:
            lines.append(f"  {r.precision:<11} {r.checkpointing:<14} not estimated: {r.error}")
            continue
        lines.append(
            f"  {r.precision:<11} {r.checkpointing:<14} {cell(r.max_batch):>8} "
            f"{cell(r.safe_batch) if r.max_batch else '-':>6} "
            f"{format_bytes(r.peak_bytes) if r.peak_bytes else '-':>10} "
            f"{format_bytes(r.state_bytes) if r.state_bytes is not None else '-':>10} "
            f"{cell(r.ddp_max_batch):>8} {cell(r.fsdp_max_batch):>9}{mark}"
        )
    lines += [
        "",
        "state: weights, gradients and optimizer state; checkpointing recomputes each block "
        "in the backward (slower steps; measure it with probe --checkpointing blocks); "
        "DDP/FSDP: the largest per-rank batch (bsfinder scale-out).",
    ]
    return "\n".join(lines)


def render_frontier(points: Sequence[FrontierPoint], *, target: str) -> str:
    """The largest batch per sequence length, a line per length."""
    lines = [
        f"largest batch per sequence length ({target}):",
        f"  {'length':>7}  {'largest':>8}  {'safe':>8}  {'tokens/step':>12}  {'peak':>10}",
    ]
    for p in points:
        lines.append(
            f"  {p.sequence_length:>7}  {p.max_batch if p.max_batch else 'none':>8}  "
            f"{p.safe_batch if p.safe_batch else '-':>8}  "
            f"{p.tokens_per_step if p.tokens_per_step else '-':>12}  "
            f"{format_bytes(p.peak_bytes) if p.peak_bytes else '-':>10}"
        )
    return "\n".join(lines)
