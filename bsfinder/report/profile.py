"""Plain-text rendering of a memory profile."""

from __future__ import annotations

from bsfinder.memory.profile import CATEGORIES, MemoryProfile, MemoryScaling
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
    if profile.scaling is not None:
        lines += ["", *_render_scaling(profile.scaling)]
    if profile.module_activation_bytes:
        lines += ["", "activation memory held after each module's forward (largest first):"]
        for name, value in list(profile.module_activation_bytes.items())[:top]:
            lines.append(f"  {format_bytes(value):>10}  {name}")
    return "\n".join(lines)


def _render_scaling(scaling: MemoryScaling) -> list[str]:
    (small, large), (low, high) = scaling.batch_sizes, scaling.peak_bytes
    steepest = max(scaling.phase_lines, key=lambda k: scaling.phase_lines[k][1], default="step")
    lines = [
        f"fixed {format_bytes(int(scaling.fixed_bytes))} + "
        f"{format_bytes(int(scaling.per_sample_bytes))} per sample ({steepest} phase; "
        f"peaks {format_bytes(low)} at batch {small}, {format_bytes(high)} at batch {large})"
    ]
    if scaling.per_sample_bytes <= 0:
        return [*lines, "  the peak did not grow with the batch: no largest batch to predict"]
    for p in scaling.predictions:
        memory = format_bytes(p["memory_bytes"])
        where = f"this device ({memory})" if p["label"] == "this device" else memory
        found = p["max_batch"]
        answer = "not even batch 1" if found == 0 else f"batch {found}"
        lines.append(f"  largest batch predicted for {where}: {answer}")
    if scaling.predictions:
        lines.append(
            "  (a prediction from two steps; 'bsfinder probe' measures it, "
            "'bsfinder estimate' models another device's context and rounding)"
        )
    return lines
