"""CUDA backend: caching-allocator statistics, NVML, and an optional capacity cap."""

from __future__ import annotations

import os
from typing import Any

from bsfinder.devices._nvml import nvml_device_info, nvml_memory, nvml_process_memory
from bsfinder.devices.base import DeviceBackend, MemoryReading

__all__ = ["CudaBackend", "cuda_uuid"]


def cuda_uuid(index: int) -> str:
    """The torch device's UUID, as NVML spells it (``GPU-...``), or "" if unknown."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        return ""
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


class CudaBackend(DeviceBackend):
    """One CUDA device. The allocator's reserved bytes are what a cap or the card limits."""

    peak_resettable = True

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = f"cuda:{index}"
        self._capped = False
        self._budget: int | None = None
        self._capacity: int | None = None
        self._outside: int | None = None
        self._previous_fraction = 1.0

    def apply_budget(self, memory_limit_bytes: int | None, *, enforce: bool = True) -> int:
        """Cap the caching allocator so that the whole process fits in ``memory_limit_bytes``.

        A smaller card also holds this process's memory outside the allocator (CUDA context,
        cuBLAS/cuDNN workspaces, loaded kernels), measured here after the warm-up step: the
        allocator gets the budget minus that.
        """
        import torch

        torch.cuda.set_device(self.index)
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info(self.index)
        reserved = torch.cuda.memory_reserved(self.index)
        # What this process can still reserve: free memory plus what it already reserved.
        capacity = free + reserved
        used = nvml_process_memory(cuda_uuid(self.index), os.getpid())
        self._outside = max(0, used - reserved) if used is not None else None
        self._budget = memory_limit_bytes
        if memory_limit_bytes is not None:
            allocator_budget = memory_limit_bytes - (self._outside or 0)
            if allocator_budget <= 0:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory: this process already uses {self._outside} bytes "
                    f"outside the allocator, more than the budget of {memory_limit_bytes} bytes"
                )
            capacity = min(capacity, allocator_budget)
            if enforce:
                getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
                self._previous_fraction = getter(self.index) if getter else 1.0
                torch.cuda.set_per_process_memory_fraction(
                    min(1.0, allocator_budget / total), self.index
                )
                self._capped = True
        self._capacity = capacity
        return capacity

    def release_budget(self) -> None:
        if self._capped:
            import torch

            torch.cuda.set_per_process_memory_fraction(self._previous_fraction, self.index)
            self._capped = False

    @property
    def under_limit(self) -> bool:
        return False  # the CUDA allocator raises its own, unambiguous out-of-memory errors

    def reset_peak(self) -> None:
        import torch

        torch.cuda.synchronize(self.index)
        torch.cuda.reset_peak_memory_stats(self.index)

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize(self.index)

    def empty_cache(self) -> None:
        import torch

        torch.cuda.empty_cache()

    def read(self) -> MemoryReading:
        import torch

        reserved = torch.cuda.max_memory_reserved(self.index)
        used_total = nvml_memory(cuda_uuid(self.index))
        return MemoryReading(
            peak_bytes=reserved,
            peak_allocated_bytes=torch.cuda.max_memory_allocated(self.index),
            peak_reserved_bytes=reserved,
            device_used_bytes=used_total[0] if used_total else None,
            device_total_bytes=used_total[1] if used_total else None,
        )

    def describe(self) -> dict[str, Any]:
        import torch

        props = torch.cuda.get_device_properties(self.index)
        uuid = cuda_uuid(self.index)
        return {
            "kind": "cuda",
            "name": props.name,
            "device": self.name,
            "uuid": uuid,
            "total_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "cuda_version": torch.version.cuda,
            "budget_bytes": self._budget,
            "capacity_bytes": self._capacity,
            "budget_enforced": self._capped,
            "outside_allocator_bytes": self._outside,
            **nvml_device_info(uuid),
        }
