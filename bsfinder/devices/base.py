"""The interface a device backend offers to a trial, and device-name resolution."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from bsfinder.errors import SpecError

__all__ = ["DeviceBackend", "MemoryReading", "backend_for", "resolve_device"]


@dataclass(frozen=True)
class MemoryReading:
    """Memory after a trial's steps; fields a backend cannot measure stay None (bytes)."""

    peak_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    device_used_bytes: int | None = None
    device_total_bytes: int | None = None
    peak_rss_bytes: int | None = None


class DeviceBackend(ABC):
    """What a trial needs from a device: a budget, peaks, synchronisation, a description.

    Lifecycle in a worker: ``apply_budget`` once (before the model exists, so the weights
    count against it), then per trial ``reset_peak`` ... steps ... ``read``.
    """

    #: torch device string, e.g. "cpu" or "cuda:0"
    name: str
    #: whether ``reset_peak`` truly resets the peak ``read`` reports; when not, the worker is
    #: restarted before a trial smaller than the previous one so that its peak is its own.
    peak_resettable: bool = True

    @abstractmethod
    def apply_budget(self, budget_bytes: int | None, *, enforce: bool = True) -> int:
        """Put the memory budget in force; return the capacity trials are compared with."""

    @abstractmethod
    def release_budget(self) -> None:
        """Undo ``apply_budget`` (in-process runs give the process its limits back)."""

    @property
    @abstractmethod
    def under_limit(self) -> bool:
        """An address-space budget is in force, which makes a few ambiguous RuntimeErrors
        (oneDNN primitives, thread creation) allocation failures; see ``oom_kind``."""

    @abstractmethod
    def reset_peak(self) -> None:
        """Start a new peak measurement."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for queued device work, so that wall time is the work's time."""

    @abstractmethod
    def read(self) -> MemoryReading:
        """Memory readings since ``reset_peak``."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Kind, name, totals and identifiers of the device, for the result."""

    def empty_cache(self) -> None:  # noqa: B027 - optional hook
        """Return cached memory to the device between trials (CUDA)."""


def resolve_device(text: str) -> str:
    """Turn ``auto``, ``cpu``, ``cuda``, ``cuda:N`` into a concrete torch device string.

    Raises:
        SpecError: the device is unknown or not available here.
    """
    import torch

    value = text.strip().lower()
    if value == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return "cpu"
    if value == "cuda" or value.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise SpecError(
                f"--device {text}: CUDA is not available here (torch {torch.__version__}, "
                "no GPU visible); use --device cpu with --memory-limit"
            )
        index = 0 if value == "cuda" else _index(value, text)
        count = torch.cuda.device_count()
        if index >= count:
            raise SpecError(f"--device {text}: only {count} CUDA device(s) are visible")
        return f"cuda:{index}"
    raise SpecError(f"--device {text!r}: use auto, cpu, cuda or cuda:N")


def _index(value: str, text: str) -> int:
    try:
        index = int(value.split(":", 1)[1])
    except ValueError:
        raise SpecError(f"--device {text!r}: use cuda:N with an integer N") from None
    if index < 0:
        raise SpecError(f"--device {text!r}: the index must be >= 0")
    return index


def backend_for(device: str, *, in_process: bool = False) -> DeviceBackend:
    """The backend for a resolved device string (``in_process``: not in a worker)."""
    if device == "cpu":
        from bsfinder.devices.cpu import CpuBackend

        return CpuBackend(in_process=in_process)
    from bsfinder.devices.cuda import CudaBackend

    return CudaBackend(int(device.split(":", 1)[1]))
