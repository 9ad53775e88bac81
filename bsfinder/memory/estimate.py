"""Peak memory of a training step on a device you do not have, without allocating it.

The model is built under ``FakeTensorMode`` (its parameters are fake tensors: shapes,
dtypes, no data), the same forward, loss, backward and optimizer step as a probe trial run
on them, and :class:`~bsfinder.memory.tracking.LiveBytes` adds up the storages the step holds,
each at the size the target's allocator would hand out. What the target adds outside
tensors (CUDA context, cuBLAS workspace, caching-allocator segments) comes from
:class:`TargetDevice`. Since a fake step costs the same at any batch size, the largest batch
is found with the probe's own :func:`~bsfinder.core.search.search` over fake steps.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bsfinder.core.fit import line_through
from bsfinder.core.search import Granularity, SearchResult, search
from bsfinder.errors import BsfinderError, SpecError, UserCodeError, is_batchnorm_one_sample
from bsfinder.options import SearchOptions
from bsfinder.units import format_bytes

__all__ = ["EstimatePoint", "MemoryEstimate", "TargetDevice", "estimate_workload"]

MIB = 2**20
#: the CPU allocator's alignment, and glibc's mmap threshold as bsfinder's trials set it
_CPU_ALIGN = 64
_PAGE = 4096
_MMAP_THRESHOLD = 131072
#: PyTorch's CUDA caching allocator: every block is a multiple of 512 B; blocks up to 1 MiB
#: come from 2 MiB segments, up to 10 MiB from 20 MiB segments, larger ones are rounded up
#: to 2 MiB (c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize, kSmallBuffer, kLargeBuffer,
#: kMinLargeAlloc, kRoundLarge)
_CUDA_BLOCK = 512
_CUDA_SMALL = 1 * MIB
_CUDA_MIN_LARGE = 10 * MIB
_CUDA_ROUND_LARGE = 2 * MIB
_CUDA_SEGMENT_SLACK = 2 * MIB + 20 * MIB
#: a CUDA context with lazy module loading, as commonly reported for recent drivers (300 to
#: 600 MiB depending on GPU, driver and libraries); measure yours with 'bsfinder profile'
#: on the GPU ("outside the allocator") and pass it as context_bytes
DEFAULT_CUDA_CONTEXT = 512 * MIB
#: cuBLAS workspace PyTorch allocates per handle and stream, inside the caching allocator:
#: 32 MiB on Hopper (sm90), ':4096:2:16:8' = 8.125 MiB elsewhere (CublasHandlePool.cpp)
DEFAULT_CUBLAS_WORKSPACE = 32 * MIB
#: oneDNN keeps every convolution primitive it creates (JIT-compiled code and buffers) in
#: its primitive cache. Measured on this project's AVX-512 CPU (torch 2.13, oneDNN 3.12),
#: as peak with the cache on minus off, over forward, backward-data and backward-weight
#: primitives: 0.78 (SmallCNN, 17), 0.89 (ResNet basic, 32), 0.93 MiB (ResNet bottleneck,
#: 50) each, whatever the batch.
ONEDNN_PRIMITIVE_BYTES = int(0.875 * MIB)


@dataclass(frozen=True)
class TargetDevice:
    """What a device adds to the tensors of a step, and how it rounds them.

    Attributes:
        kind: ``"cpu"`` or ``"cuda"``.
        memory_bytes: the memory a step may use (CPU: the budget; CUDA: the card's total).
            None: no largest batch is searched.
        context_bytes: memory the device holds before any tensor (CUDA context).
        workspace_bytes: library workspaces inside the allocator (cuBLAS).
    """

    kind: str = "cpu"
    memory_bytes: int | None = None
    context_bytes: int = 0
    workspace_bytes: int = 0

    @classmethod
    def cuda(
        cls,
        memory_bytes: int | None,
        *,
        context_bytes: int | None = None,
        workspace_bytes: int | None = None,
    ) -> TargetDevice:
        """A CUDA GPU with the default context and cuBLAS workspace unless given."""
        return cls(
            "cuda",
            memory_bytes,
            DEFAULT_CUDA_CONTEXT if context_bytes is None else context_bytes,
            DEFAULT_CUBLAS_WORKSPACE if workspace_bytes is None else workspace_bytes,
        )

    def allocation_bytes(self, nbytes: int) -> int:
        """Bytes the target's allocator takes for a storage of ``nbytes``."""
        if self.kind == "cuda":
            size = max(_CUDA_BLOCK, -(-nbytes // _CUDA_BLOCK) * _CUDA_BLOCK)
            if size > _CUDA_MIN_LARGE:
                size = -(-size // _CUDA_ROUND_LARGE) * _CUDA_ROUND_LARGE
            return size
        # posix_memalign(64, n) in glibc: page-rounded mmap above the threshold, else heap
        if nbytes >= _MMAP_THRESHOLD:
            return -(-(nbytes + _CPU_ALIGN + 32) // _PAGE) * _PAGE
        return -(-(nbytes + 16) // 16) * 16

    def outside_tensors_bytes(self, conv_primitives: int) -> int:
        """What the target holds besides the step's tensors: context, workspaces, segment
        rounding (CUDA); oneDNN's cached convolution primitives (CPU)."""
        if self.kind == "cuda":
            return self.context_bytes + self.workspace_bytes + _CUDA_SEGMENT_SLACK
        return self.context_bytes + self.workspace_bytes + conv_primitives * ONEDNN_PRIMITIVE_BYTES

    def unseen(self, *, kernel_scratch: bool = True) -> list[str]:
        """Effects an estimate on fake tensors cannot see on this target, with their sizes
        (``kernel_scratch``: whether convolution scratch was measured, CPU only)."""
        if self.kind == "cuda":
            return [
                "memory a kernel allocates and frees inside one call: cuDNN convolution "
                "workspaces, from 0 to hundreds of MiB depending on the algorithm cuDNN picks",
                "the estimate traces the CPU kernels: attention backends (flash, "
                "memory-efficient, math) and autocast's op lists differ on CUDA, which "
                "changes what is saved for backward (the math backend saves the whole "
                "B x heads x L x L attention matrix)",
                "caching-allocator fragmentation: freed blocks that a later, different-sized "
                "request cannot reuse (reserved minus allocated; typically a few percent, "
                f"more for models with many odd sizes); segment rounding adds "
                f"{format_bytes(_CUDA_SEGMENT_SLACK)} here",
                f"the CUDA context is assumed to be {format_bytes(self.context_bytes)} "
                "(300-600 MiB is typical; it depends on GPU, driver and loaded libraries)",
                "NCCL buffers and other processes on the GPU",
            ]
        scratch = (
            "convolution scratch on a CPU other than this one (it was measured here; "
            "another CPU's oneDNN kernels may need more or less)"
            if kernel_scratch
            else "oneDNN's convolution scratch (reorders to blocked layouts, about the size "
            "of the call's input plus output: tens of MiB for conv nets) was not measured"
        )
        return [
            scratch,
            "memory other kernels allocate and free inside one call (GEMM packing buffers, "
            "measured 1-12 MiB here), far more for bfloat16 matmuls, which oneDNN converts "
            "and packs inside the call: on a CPU, estimate bf16 as a rough guide and probe "
            "it (a 4-layer GPT-2 step was estimated 11% low in bf16-mixed and 14% in "
            "bf16-true; residual MLP blocks under 64 MiB: 2563 estimated, 1771 probed)",
            "Python objects of the model and the autograd graph (heap, a few MiB)",
            "heap fragmentation below glibc's mmap threshold (128 KiB)",
        ]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class EstimatePoint:
    """The estimated peak of one training step at one batch size, in bytes.

    Attributes:
        batch_size: samples in the step.
        tensor_peak_bytes: live tensors at the peak (with the target's rounding).
        outside_tensors_bytes: what the target holds besides tensors (see
            :meth:`TargetDevice.outside_tensors_bytes`).
        peak_bytes: tensors, scratch and outside together.
        peak_phase: ``forward``, ``backward`` or ``optimizer``.
        fits: ``peak_bytes`` within the target's memory (None without one).
        kernel_scratch_bytes: memory inside the kernel running at the peak (CPU
            convolutions, measured by :class:`~bsfinder.memory.scratch.ScratchModel`).
        tensor_max_bytes: the peak of live tensors alone, wherever it is in the step.
    """

    batch_size: int
    tensor_peak_bytes: int
    outside_tensors_bytes: int
    peak_bytes: int
    peak_phase: str
    fits: bool | None
    kernel_scratch_bytes: int = 0
    tensor_max_bytes: int = 0


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory per batch size, and the largest batch for a target.

    Attributes:
        points: every batch estimated (requested ones and the search's), by batch size.
        target: the target device model (:class:`TargetDevice` as a dict).
        state_bytes: weights, gradients and optimizer state (exact byte counts).
        per_sample_bytes: slope of the peak between the two largest estimated batches.
        max_batch: largest batch whose estimated peak fits the target (None: no target, or
            nothing fits).
        safe_batch: largest estimated batch whose peak leaves ``headroom`` of the target's
            memory free (the probe's rule; None as ``max_batch``).
        headroom: the fraction of the target's memory the safe batch leaves free.
        first_failure: smallest estimated batch above ``max_batch`` that does not fit.
        unseen: what the estimate cannot see on this target, with sizes.
        seconds: wall time of the estimate.
    """

    points: tuple[EstimatePoint, ...]
    target: dict[str, Any]
    state_bytes: dict[str, int]
    per_sample_bytes: float | None
    max_batch: int | None
    first_failure: int | None
    unseen: tuple[str, ...]
    seconds: float
    workload: dict[str, Any] = field(default_factory=dict)
    safe_batch: int | None = None
    headroom: float = 0.0
    schema_version: int = 2

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"kind": "estimate", **asdict(self)}

    def point(self, batch_size: int) -> EstimatePoint:
        """The estimate at one batch size (KeyError if it was not estimated)."""
        for p in self.points:
            if p.batch_size == batch_size:
                return p
        raise KeyError(batch_size)


def estimate_workload(
    workload: Any,
    target: TargetDevice,
    *,
    batch_sizes: Sequence[int] = (),
    granularity: Granularity = SearchOptions.granularity,
    max_batch: int | None = SearchOptions.max_batch,
    kernel_scratch: bool = True,
    headroom: float = 0.0,
) -> MemoryEstimate:
    """Estimate ``workload``'s step at ``batch_sizes`` and, with a target memory, search the
    largest batch (and the safe one, whose peak leaves ``headroom`` of it free, estimated
    too). ``workload`` is a :class:`~bsfinder.workload.step.Workload` on CPU, loaded but
    not built; a live model in it is copied with fake parameters, never touched.
    ``kernel_scratch``: on a CPU target, measure oneDNN's convolution scratch on this CPU
    (:mod:`bsfinder.memory.scratch`: real convolutions at small batches in a child process)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bsfinder.memory.scratch import ScratchModel, scratch_measurable
    from bsfinder.memory.tracking import tensor_bytes

    if workload.has_train_step:
        raise SpecError(
            "estimate needs a model (a spec, class, factory or module): a train_step runs on "
            "real tensors, so it cannot be traced without allocating them"
        )
    started = time.perf_counter()
    points: dict[int, EstimatePoint] = {}
    measured = kernel_scratch and target.kind == "cpu" and scratch_measurable()
    scratch = ScratchModel() if measured else None
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.device("cpu"):
        _build_fake(workload, mode)
        workload.begin_trial()
        try:
            _guarded(None, workload.step, workload.make_batch(2))  # optimizer state
            stats = workload.parameter_stats()  # FSDP's blocks for scale-out, checkpointing
            params = list(workload.model.parameters())
            state = {
                "weights": tensor_bytes(workload.model),  # parameters and buffers
                "gradients": tensor_bytes([p for p in params if p.requires_grad]),
                "optimizer_state": tensor_bytes(workload.optimizer),
            }

            def measure(batch_size: int) -> EstimatePoint:
                if batch_size not in points:
                    points[batch_size] = _measure(workload, target, batch_size, scratch)
                return points[batch_size]

            for b in batch_sizes:
                measure(b)
            found = first_failure = safe = None
            if target.memory_bytes is not None:
                capacity = target.memory_bytes

                def search_from(start: int) -> SearchResult:
                    return search(
                        _Outcome.wrap(measure),
                        capacity_bytes=capacity,
                        start=start,
                        granularity=granularity,
                        max_batch=max_batch,
                        memory_model=True,
                        headroom=headroom,
                    )

                try:
                    result = search_from(1)
                except UserCodeError as exc:
                    # BatchNorm cannot train on one sample: search from 2, as the probe does
                    if not is_batchnorm_one_sample(exc) or (
                        max_batch is not None and max_batch < 2
                    ):
                        raise
                    result = search_from(2)
                found, first_failure = result.max_batch, result.first_failure
                safe = _estimated_safe(result.safe_batch, measure, capacity, headroom, found)
        finally:
            workload.end_trial()
            workload.model = None
    ordered = tuple(points[b] for b in sorted(points))
    slope = None
    if len(ordered) >= 2:
        low, high = ordered[-2], ordered[-1]
        slope = line_through((low.batch_size, low.peak_bytes), (high.batch_size, high.peak_bytes))[
            1
        ]
    return MemoryEstimate(
        points=ordered,
        target=target.to_dict(),
        state_bytes=state,
        per_sample_bytes=slope,
        max_batch=found,
        first_failure=first_failure,
        unseen=tuple(target.unseen(kernel_scratch=measured)),
        seconds=time.perf_counter() - started,
        workload={**workload.spec.describe(), **stats},
        safe_batch=safe,
        headroom=headroom,
    )


def _estimated_safe(
    safe: int | None,
    measure: Any,
    capacity: int,
    headroom: float,
    largest: int | None,
) -> int | None:
    """The safe batch, estimated: the search may read it off the memory line without a
    step; here a step is cheap, so it is traced, and lowered along the slope between it and
    the largest batch while its peak takes more than ``1 - headroom`` of the capacity."""
    if safe is None or largest is None:
        return safe
    limit = (1 - headroom) * capacity
    top = measure(largest)
    for _ in range(16):
        point = measure(safe)
        if point.peak_bytes <= limit or safe <= 1:
            return safe
        slope = (top.peak_bytes - point.peak_bytes) / (largest - safe) if largest > safe else 0
        over = point.peak_bytes - limit
        step = math.ceil(over / slope) + 1 if slope > 0 else max(1, safe // 100)
        safe = max(1, safe - step)
    return safe if measure(safe).peak_bytes <= limit else None


class _Outcome:
    """An estimate point as the search's outcome: fits against the target's memory."""

    def __init__(self, point: EstimatePoint) -> None:
        self.batch_size = point.batch_size
        self.fits = bool(point.fits)
        self.peak_bytes: int | None = point.peak_bytes

    @classmethod
    def wrap(cls, measure: Any) -> Any:
        return lambda batch_size: cls(measure(batch_size))


def _measure(
    workload: Any, target: TargetDevice, batch_size: int, scratch: Any = None
) -> EstimatePoint:
    from bsfinder.memory.scratch import conv_call
    from bsfinder.memory.tracking import LiveBytes

    batch = workload.make_batch(batch_size)
    existing = (workload.model, workload.optimizer, batch)
    primitives: set[tuple[Any, ...]] = set()
    convs: list[tuple[Any, int, int, str]] = []  # call, its batch, live bytes, phase

    def watch(func: Any, args: Any, out: Any) -> None:
        _conv_primitives(primitives, func, args)
        if scratch is not None and (found := conv_call(func, args, out)) is not None:
            convs.append((*found, live.live_bytes, live.phase))

    with LiveBytes(target.allocation_bytes, existing=existing, on_op=watch) as live:
        _guarded(batch_size, workload.step, batch)
    del batch
    tensors, phase, in_kernel = live.peak_bytes, live.peak_phase, 0
    if scratch is not None and convs:
        scratch.measure(call for call, *_ in convs)
        for call, n, live_bytes, at in convs:
            extra = scratch.bytes(call, n)
            if live_bytes + extra > tensors + in_kernel:
                tensors, phase, in_kernel = live_bytes, at, extra
    outside = target.outside_tensors_bytes(len(primitives))
    peak = tensors + in_kernel + outside
    fits = None if target.memory_bytes is None else peak <= target.memory_bytes
    return EstimatePoint(
        batch_size, tensors, outside, peak, phase, fits, in_kernel, live.peak_bytes
    )


def _conv_primitives(found: set[tuple[Any, ...]], func: Any, args: Any) -> None:
    """Add the distinct convolution primitives (forward, backward-data, backward-weight)."""
    import torch

    aten = torch.ops.aten
    if func is aten.convolution.default:
        found.add(("forward", _signature(args)))
    elif func is aten.convolution_backward.default:
        mask, sig = args[-1], _signature(args[:-1])
        for name, wanted in zip(("data", "weight"), mask[:2], strict=True):
            if wanted:
                found.add((name, sig))


def _signature(args: Any) -> tuple[Any, ...]:
    import torch

    return tuple(
        (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else repr(a) for a in args
    )


def _guarded(batch_size: int | None, step: Any, *args: Any) -> None:
    try:
        step(*args)
    except BsfinderError:
        raise
    except Exception as exc:
        if type(exc).__module__.startswith("torch._subclasses") or "FakeTensor" in str(exc):
            raise BsfinderError(
                "the model cannot be traced with fake tensors (it needs real values, e.g. "
                f"data-dependent shapes or .item()): {str(exc).splitlines()[0][:200]}; "
                "measure it with 'bsfinder profile' or 'bsfinder probe' instead"
            ) from exc
        raise UserCodeError.from_exception(exc, batch_size=batch_size) from exc


#: what FakeTensorMode raises for an operation it cannot run without real values
_FAKE_TENSOR_ERRORS = frozenset(
    {
        "DataDependentOutputException",
        "DynamicOutputShapeException",
        "UnsupportedOperatorException",
        "UnsupportedFakeTensorException",
    }
)
#: ``torch.nn.init``'s initialisers, replaced while a model is built with fake tensors:
#: values do not matter there, and some read them (torch 2.13's ``trunc_normal_`` draws by
#: rejection, with ``.item()`` and ``mask.any()``: a ViT's constructor failed under fake
#: tensors before)
_INITIALISERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
    "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
    "orthogonal_", "sparse_",
    # the helper trunc_normal_ calls: libraries that keep their own reference to
    # trunc_normal_ (transformers 5's TORCH_INIT_FUNCTIONS) still reach it by global name
    "_no_grad_trunc_normal_",
)  # fmt: skip


@contextlib.contextmanager
def _shape_only_init() -> Iterator[None]:
    """``torch.nn.init``'s initialisers as no-ops (the tensor returned as it is): a model
    built under fake tensors is initialised for shape only. Code that calls them as
    ``nn.init.trunc_normal_`` (transformers) sees the no-op; a module that imported the
    function itself before keeps the original."""
    import torch

    saved = {
        name: getattr(torch.nn.init, name) for name in _INITIALISERS if hasattr(torch.nn.init, name)
    }

    def shape_only(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor

    try:
        for name in saved:
            setattr(torch.nn.init, name, shape_only)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _build_fake(workload: Any, mode: Any) -> None:
    """The workload's model with fake parameters and buffers, checked as a real build is."""
    import torch

    from bsfinder.memory.tracking import tensors_in

    if workload.model is not None:  # a live module: copy its structure, fake its tensors
        memo: dict[int, Any] = {}
        for t in tensors_in(workload.model):
            fake = mode.from_tensor(t)
            if isinstance(t, torch.nn.Parameter):
                fake = torch.nn.Parameter(fake, requires_grad=t.requires_grad)
            memo[id(t)] = fake
        workload.model = copy.deepcopy(workload.model, memo)
    else:
        try:
            with _shape_only_init():
                workload.model = workload.create_model("cpu")
        except UserCodeError as exc:
            if exc.exc_type not in _FAKE_TENSOR_ERRORS:
                raise
            raise BsfinderError(
                f"bsfinder could not build the model with fake tensors: its constructor ran "
                f"an operation that needs real values ({exc.exc_type}: "
                f"{exc.detail.strip().splitlines()[0][:160] if exc.detail.strip() else ''}), "
                "which a fake tensor does not have. This is a limit of the estimate, not a "
                "fault in the model: measure it with 'bsfinder profile' or 'bsfinder probe' "
                "on a real device instead"
            ) from exc
    workload.build()  # train mode, trainable parameters, inputs to make a batch
