"""Plain-text rendering of a memory profile."""

from __future__ import annotations

from bsfinder.profiling import CATEGORIES, MemoryProfile
from bsfinder.units import format_bytes

__all__ = ["render_profile"]

_LABELS = {
    "weights": "weights (parameters, buffers)",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "optimizer_step_temporaries": "optimizer step temporaries",
    "inputs": "inputs (the batch)",
    "activations": "activations",
    "temporaries": "temporaries",
    "other_tensors": "other tensors",
    "not_tensors": "not tensors (allocator, kernels, Python)",
}


def render_profile(profile: MemoryProfile, *, top: int = 10) -> str:
    """The breakdown at the peak, and the modules holding the most activation memory."""
    peak = profile.peak_bytes or 1
    lines = [
        f"batch {profile.batch_size}: peak {format_bytes(profile.peak_bytes)} during the "
        f"{profile.peak_phase} step (tensors {format_bytes(profile.tracked_peak_bytes)})",
        "",
    ]
    width = max(len(label) for label in _LABELS.values())
    for key in CATEGORIES:
        value = profile.breakdown.get(key, 0)
        lines.append(f"  {_LABELS[key]:<{width}}  {format_bytes(value):>10}  {value / peak:6.1%}")
    lines.append(f"  {'total':<{width}}  {format_bytes(sum(profile.breakdown.values())):>10}")
    if profile.allocator_overhead_bytes is not None:
        lines.append(
            f"  {'+ allocator cache (reserved - allocated)':<{width}}  "
            f"{format_bytes(profile.allocator_overhead_bytes):>10}"
        )
    if profile.outside_allocator_bytes is not None:
        lines.append(
            f"  {'+ outside the allocator (NVML)':<{width}}  "
            f"{format_bytes(profile.outside_allocator_bytes):>10}"
        )
    if profile.phase_peak_bytes:
        phases = ", ".join(
            f"{name} {format_bytes(value)}" for name, value in profile.phase_peak_bytes.items()
        )
        lines += ["", f"tensor peak by phase: {phases}"]
    if profile.module_activation_bytes:
        lines += ["", "activation memory held after each module's forward (largest first):"]
        for name, value in list(profile.module_activation_bytes.items())[:top]:
            lines.append(f"  {format_bytes(value):>10}  {name}")
    return "\n".join(lines)
