"""Where the memory of one training step goes: a breakdown at the peak, per module.

One warm-up step creates the optimizer state, then one step runs under torch's own
``MemTracker`` (``torch.distributed._tools.mem_tracker``), which attributes every live tensor
to parameters, gradients, optimizer, activations or temporaries. bsfinder refines that with
exact counts (the batch's own bytes, the optimizer's real state tensors) and sets it against
the device's measured peak, so that the categories sum to what was measured: the part no
tensor accounts for (allocator overhead, kernel scratch, Python objects) is its own line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from bsfinder.devices.base import DeviceBackend
from bsfinder.errors import BsfinderError

if TYPE_CHECKING:  # the tracker imports torch: only when a profile runs
    from bsfinder.tracking import TimelinePoint

#: the most timeline points a profile keeps
TIMELINE_POINTS = 2000

__all__ = ["CATEGORIES", "MemoryProfile", "profile_does_not_fit", "profile_step"]

#: categories of a profile, in the order they are shown
CATEGORIES = (
    "weights",
    "gradients",
    "optimizer_state",
    "optimizer_step_temporaries",
    "inputs",
    "activations",
    "temporaries",
    "other_tensors",
    "not_tensors",
)


@dataclass(frozen=True)
class MemoryProfile:
    """The memory of one training step at one batch size, in bytes.

    Attributes:
        batch_size: samples in the step.
        peak_bytes: the device's measured peak for the step (CPU: address space above the
            process baseline; CUDA: allocator peak allocated).
        breakdown: bytes per category at the tracked peak (see ``CATEGORIES``); they sum to
            ``peak_bytes``, ``not_tensors`` being the part no live tensor accounts for.
        tracked_peak_bytes: the peak of live tensor bytes seen by the tracker.
        peak_phase: when the tensor peak happened: ``forward``, ``backward`` or ``optimizer``.
        module_activation_bytes: per module (qualified name), activation bytes still held
            when its forward returned (what checkpointing it could free), largest first.
        allocator_overhead_bytes: CUDA: peak reserved minus peak allocated (caching and
            fragmentation), on top of ``peak_bytes``. CPU: None.
        outside_allocator_bytes: CUDA: NVML device used minus reserved (CUDA context,
            cuBLAS/cuDNN workspaces, other processes). CPU: None.
        device: what ran the step.
        phase_peak_bytes: the peak of live tensor bytes in the forward (with the loss),
            backward and optimizer phases.
        timeline: ``(op index, live tensor bytes, phase)`` after the aten ops of the tracked
            step (at most ``TIMELINE_POINTS``, keeping the peak).
    """

    batch_size: int
    peak_bytes: int
    breakdown: dict[str, int]
    tracked_peak_bytes: int
    peak_phase: str
    module_activation_bytes: dict[str, int] = field(default_factory=dict)
    allocator_overhead_bytes: int | None = None
    outside_allocator_bytes: int | None = None
    device: dict[str, Any] = field(default_factory=dict)
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)
    timeline: list[tuple[int, int, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def profile_does_not_fit(batch_size: int, reason: str) -> BsfinderError:
    """The error for a profile whose batch does not fit, with the allocator's reason."""
    return BsfinderError(
        f"batch {batch_size} does not fit, so it cannot be profiled ({reason}); profile a "
        "smaller batch, or run 'bsfinder probe' to find the largest"
    )


def profile_step(workload: Any, backend: DeviceBackend, batch_size: int) -> MemoryProfile:
    """Run a warm-up step, then one tracked step, and break the peak down."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from bsfinder.tracking import LiveBytes, tensor_bytes

    workload.begin_trial()
    try:
        batch = workload.make_batch(batch_size)
        workload.step(batch)  # warm-up: creates the optimizer state, as training's first step
        backend.synchronize()
        backend.reset_peak()
        tracker = MemTracker()
        tracker.track_external(*(o for o in (workload.model, workload.optimizer) if o is not None))
        live = LiveBytes(existing=(workload.model, workload.optimizer, batch))
        with tracker, live:
            workload.step(batch)
            backend.synchronize()
        reading = backend.read()
        device = torch.device(workload.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        peak = {str(k): v for k, v in tracker.get_tracker_snapshot("peak")[device].items()}
        modules = _module_activations(tracker, device)
        phase = _peak_phase(tracker, workload.model, device, peak["Total"])
        state = tensor_bytes(workload.optimizer)
        input_bytes = tensor_bytes(batch)
    finally:
        workload.end_trial()
    weights = peak.get("_MemRefType.PARAM", 0) + peak.get("_MemRefType.BUFFER", 0)
    optimizer = peak.get("_MemRefType.OPT", 0)
    activations = peak.get("_MemRefType.ACT", 0)
    breakdown = {
        "weights": weights,
        "gradients": peak.get("_MemRefType.GRAD", 0),
        "optimizer_state": min(state, optimizer),
        "optimizer_step_temporaries": max(0, optimizer - state),
        # the batch exists before tracking starts, so the tracker never sees it: count it here
        "inputs": input_bytes,
        "activations": activations,
        "temporaries": peak.get("_MemRefType.TEMP", 0),
        "other_tensors": peak.get("_MemRefType.OTH", 0),
    }
    tracked = peak["Total"] + input_bytes
    # CUDA: the allocator's peak allocated is the tensors' truth; CPU: the address space
    measured = reading.peak_allocated_bytes or reading.peak_bytes or tracked
    breakdown["not_tensors"] = measured - tracked
    overhead = outside = None
    if reading.peak_reserved_bytes is not None and reading.peak_allocated_bytes is not None:
        overhead = reading.peak_reserved_bytes - reading.peak_allocated_bytes
        if reading.device_used_bytes is not None:
            outside = reading.device_used_bytes - reading.peak_reserved_bytes
    return MemoryProfile(
        timeline=_downsample(live.timeline),
        phase_peak_bytes=dict(live.phase_peaks),
        batch_size=batch_size,
        peak_bytes=measured,
        breakdown=breakdown,
        tracked_peak_bytes=tracked,
        peak_phase=phase,
        module_activation_bytes=modules,
        allocator_overhead_bytes=overhead,
        outside_allocator_bytes=outside,
        device=backend.describe(),
    )


def _downsample(points: list[TimelinePoint]) -> list[tuple[int, int, str]]:
    """At most TIMELINE_POINTS points: every k-th, plus each phase change and the peak."""
    if not points:
        return []
    step = max(1, -(-len(points) // TIMELINE_POINTS))
    peak = max(points, key=lambda p: p.live_bytes)
    kept = [
        p
        for i, p in enumerate(points)
        if i % step == 0 or p is peak or i == len(points) - 1 or p.phase != points[i - 1].phase
    ]
    return [(p.op, p.live_bytes, p.phase) for p in kept]


def _module_activations(tracker: Any, device: Any) -> dict[str, int]:
    from torch.distributed._tools.mem_tracker import _ModState

    found: dict[str, int] = {}
    for stats in tracker.memory_tracking.values():
        before = stats.snapshots.get(_ModState.PRE_FW)
        after = stats.snapshots.get(_ModState.POST_FW)
        if not before or not after:
            continue
        act = "_MemRefType.ACT"
        grown = _get(after[-1], device, act) - _get(before[-1], device, act)
        if grown > 0:
            found[stats.mod_fqn] = grown
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def _get(snapshot: dict[Any, dict[Any, int]], device: Any, category: str) -> int:
    return {str(k): v for k, v in snapshot.get(device, {}).items()}.get(category, 0)


def _peak_phase(tracker: Any, model: Any, device: Any, total: int) -> str:
    """forward, backward or optimizer: where the root module's peaks reach the global one."""
    from torch.distributed._tools.mem_tracker import _ModState

    if model is None or model not in tracker.memory_tracking:
        return "unknown"
    snapshots = tracker.memory_tracking[model].snapshots
    for state, name in ((_ModState.PEAK_FW, "forward"), (_ModState.PEAK_BW, "backward")):
        for snapshot in snapshots.get(state, []):
            if _get(snapshot, device, "Total") >= total:
                return name
    return "optimizer"
