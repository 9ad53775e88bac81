"""Where the memory of one training step goes: a breakdown at the peak, per module.

One warm-up step creates the optimizer state, then one step runs under torch's own
``MemTracker`` (``torch.distributed._tools.mem_tracker``), which attributes every live tensor
to parameters, gradients, optimizer, activations or temporaries. bsfinder refines that with
exact counts (the batch's own bytes, the optimizer's real state tensors) and sets it against
the device's measured peak, so that the categories sum to what was measured: the part no
tensor accounts for (allocator overhead, kernel scratch, Python objects) is its own line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from bsfinder.core.fit import line_through
from bsfinder.devices.base import DeviceBackend
from bsfinder.errors import BsfinderError, SpecError

if TYPE_CHECKING:  # the tracker imports torch: only when a profile runs
    from bsfinder.memory.tracking import TimelinePoint

#: the most timeline points a profile keeps
TIMELINE_POINTS = 2000
#: allocation events a CUDA memory snapshot keeps (torch's visualizer handles this many)
_SNAPSHOT_ENTRIES = 100_000

__all__ = [
    "CATEGORIES",
    "MemoryProfile",
    "MemoryScaling",
    "memory_scaling",
    "profile_does_not_fit",
    "profile_step",
]

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
class MemoryScaling:
    """A step's peak as lines in the batch size, from two measured batches, and the largest
    batch those lines predict for some memory sizes.

    Each phase (forward, backward, optimizer) gets its own line through its tensor peaks at
    the two batches: the optimizer step's peak barely grows with the batch while the
    backward's grows fastest, so one line through the step's two peaks would mistake a
    small batch's optimizer peak for the fixed cost of every batch. The predicted peak is
    the highest line plus a line for the memory no tensor holds (measured peak minus tensor
    peak; on CPU it grows with the batch too: GEMM packing buffers).

    Attributes:
        batch_sizes: the two batches profiled, smaller first.
        peak_bytes: their peaks, as the probe compares them with capacity (CUDA: reserved).
        per_sample_bytes: the slope of the steepest phase, the one that bounds large batches,
            plus the slope of the memory outside tensors.
        fixed_bytes: those lines at batch 0.
        phase_lines: ``{phase: (bytes at batch 0, bytes per sample)}`` of tensor peaks.
        overhead_line: ``(bytes at batch 0, bytes per sample)`` of measured peak minus
            tensor peak.
        predictions: ``{"label", "memory_bytes", "max_batch"}`` per memory size:
            "this device" (the budget or the card) and each target. ``max_batch`` is 0 when
            not even one sample fits, None when no phase grows with the batch.
    """

    batch_sizes: tuple[int, int]
    peak_bytes: tuple[int, int]
    per_sample_bytes: float
    fixed_bytes: float
    phase_lines: dict[str, tuple[float, float]] = field(default_factory=dict)
    overhead_line: tuple[float, float] = (0.0, 0.0)
    predictions: tuple[dict[str, Any], ...] = ()

    def peak(self, batch_size: int) -> float:
        """The predicted peak at ``batch_size``."""
        a, b = self.overhead_line
        return a + b * batch_size + max(f + s * batch_size for f, s in self.phase_lines.values())

    def max_batch(self, memory_bytes: int) -> int | None:
        """The largest batch whose predicted peak is within ``memory_bytes``."""
        found: int | None = None
        for phase_fixed, phase_slope in self.phase_lines.values():
            fixed, slope = phase_fixed + self.overhead_line[0], phase_slope + self.overhead_line[1]
            room = memory_bytes - fixed
            if slope > 0:
                limit = max(0, int(room // slope))
                found = limit if found is None else min(found, limit)
            elif room < 0:
                return 0
        return found


def memory_scaling(
    small: MemoryProfile, large: MemoryProfile, memories: Sequence[tuple[str, int]] = ()
) -> MemoryScaling:
    """The per-phase lines through two profiles, and their largest batch for ``memories``
    (``(label, bytes)`` pairs)."""
    if small.batch_size > large.batch_size:
        small, large = large, small
    if small.batch_size == large.batch_size:
        raise ValueError("memory scaling needs two different batch sizes")

    def through(low: float, high: float) -> tuple[float, float]:
        return line_through((small.batch_size, low), (large.batch_size, high))

    lines = {
        phase: through(small.phase_peak_bytes.get(phase, 0), high)
        for phase, high in large.phase_peak_bytes.items()
        if high or small.phase_peak_bytes.get(phase, 0)
    }
    if lines:
        overhead = through(
            *(
                _compared_peak(p) - max(p.phase_peak_bytes.values(), default=0)
                for p in (small, large)
            )
        )
    else:  # no timeline (a profile from an older bsfinder): one line through the peaks
        lines["step"] = through(_compared_peak(small), _compared_peak(large))
        overhead = (0.0, 0.0)
    fixed, slope = max(lines.values(), key=lambda line: (line[1], line[0]))
    line = MemoryScaling(
        batch_sizes=(small.batch_size, large.batch_size),
        peak_bytes=(_compared_peak(small), _compared_peak(large)),
        per_sample_bytes=slope + overhead[1],
        fixed_bytes=fixed + overhead[0],
        phase_lines=lines,
        overhead_line=overhead,
    )
    predictions = tuple(
        {"label": label, "memory_bytes": memory, "max_batch": line.max_batch(memory)}
        for label, memory in memories
    )
    return replace(line, predictions=predictions)


def _compared_peak(profile: MemoryProfile) -> int:
    """The peak the probe compares with capacity: CUDA adds the allocator's cache."""
    return profile.peak_bytes + (profile.allocator_overhead_bytes or 0)


@dataclass(frozen=True)
class MemoryProfile:
    """The memory of one training step at one batch size, in bytes.

    Attributes:
        batch_size: samples in the step.
        peak_bytes: the device's measured peak for the step (CPU: address space above the
            process baseline; CUDA: allocator peak *allocated*, where a trial's
            ``Trial.peak_bytes`` is peak reserved: add ``allocator_overhead_bytes`` to
            compare the two; the JSON key is kept, so old profiles read the same).
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
        scaling: fixed and per-sample memory from a second, smaller batch, with the largest
            batch it predicts (None when not measured).
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
    scaling: MemoryScaling | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def profile_does_not_fit(batch_size: int, reason: str) -> BsfinderError:
    """The error for a profile whose batch does not fit, with the allocator's reason."""
    return BsfinderError(
        f"batch {batch_size} does not fit, so it cannot be profiled ({reason}); profile a "
        "smaller batch, or run 'bsfinder probe' to find the largest"
    )


def profile_step(
    workload: Any, backend: DeviceBackend, batch_size: int, *, snapshot: str | None = None
) -> MemoryProfile:
    """Run a warm-up step, then one tracked step, and break the peak down. ``snapshot``:
    write torch's CUDA memory snapshot of the tracked step there (for
    https://pytorch.org/memory_viz)."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from bsfinder.memory.tracking import LiveBytes, tensor_bytes

    workload.begin_trial()
    try:
        batch = workload.make_batch(batch_size)
        workload.step(batch)  # warm-up: creates the optimizer state, as training's first step
        backend.synchronize()
        backend.reset_peak()
        tracker = MemTracker()
        tracker.track_external(*(o for o in (workload.model, workload.optimizer) if o is not None))
        live = LiveBytes(existing=(workload.model, workload.optimizer, batch))
        with _memory_history(snapshot), tracker, live:
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


@contextlib.contextmanager
def _memory_history(path: str | None) -> Iterator[None]:
    """Record the CUDA caching allocator's history meanwhile and dump it to ``path``."""
    if path is None:
        yield
        return
    import torch

    if not torch.cuda.is_available():
        raise SpecError("a memory snapshot records the CUDA caching allocator: it needs a GPU")
    torch.cuda.memory._record_memory_history(max_entries=_SNAPSHOT_ENTRIES)
    try:
        yield
        torch.cuda.memory._dump_snapshot(path)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


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
