"""The interface a device backend offers to a trial.

The backends (``cpu``, ``cuda``, ``fake``) import this module; choosing one for a device
string is :mod:`bsfinder.devices.select`, so that nothing here imports a backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

__all__ = ["DeviceBackend", "MemoryReading"]


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
    def apply_budget(self, memory_limit_bytes: int | None, *, enforce: bool = True) -> int:
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
