"""A fake device backend for logic tests: a settable capacity and a counter of bytes.

Code that takes a :class:`~bsfinder.devices.base.DeviceBackend` (a trial, a profile, the
inline runner) can run on it without torch memory: the test's step calls :meth:`allocate` and
:meth:`free`, the backend keeps the peak, and an allocation past the capacity (or past an
enforced budget) raises ``MemoryError``, which bsfinder classifies as out of memory like any
allocator's failure. The runner-level fake, with no backend at all, is
:class:`bsfinder.execution.fake.FakeRunner`.
"""

from __future__ import annotations

from typing import Any

from bsfinder.devices.base import DeviceBackend, MemoryReading
from bsfinder.units import format_bytes

__all__ = ["FakeBackend"]


class FakeBackend(DeviceBackend):
    """A device of ``capacity_bytes`` whose memory is what :meth:`allocate` counts.

    Attributes:
        capacity_bytes: the device's memory; settable (a test can shrink the device).
        allocated_bytes: bytes allocated and not freed.
        peak_allocated_bytes: the most allocated since :meth:`reset_peak`.

    Example:
        >>> dev = FakeBackend(capacity_bytes=100)
        >>> dev.apply_budget(80)
        80
        >>> dev.allocate(60); dev.free(60); dev.read().peak_bytes
        60
        >>> dev.allocate(90)
        Traceback (most recent call last):
        MemoryError: fake device: cannot allocate 90 B with 0 B of 80 B in use
    """

    name = "fake"

    def __init__(self, *, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.allocated_bytes = 0
        self.peak_allocated_bytes = 0
        self._budget_bytes: int | None = None
        self._enforced = False

    @property
    def limit_bytes(self) -> int:
        """What an allocation may reach: the enforced budget, else the capacity."""
        if self._enforced and self._budget_bytes is not None:
            return min(self._budget_bytes, self.capacity_bytes)
        return self.capacity_bytes

    def allocate(self, nbytes: int) -> None:
        """Count ``nbytes`` more in use; ``MemoryError`` past :attr:`limit_bytes`."""
        if nbytes < 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        if self.allocated_bytes + nbytes > self.limit_bytes:
            raise MemoryError(
                f"fake device: cannot allocate {format_bytes(nbytes)} with "
                f"{format_bytes(self.allocated_bytes)} of {format_bytes(self.limit_bytes)} in use"
            )
        self.allocated_bytes += nbytes
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)

    def free(self, nbytes: int) -> None:
        """Count ``nbytes`` fewer in use."""
        if not 0 <= nbytes <= self.allocated_bytes:
            raise ValueError(f"cannot free {nbytes} bytes of {self.allocated_bytes} allocated")
        self.allocated_bytes -= nbytes

    def apply_budget(self, memory_limit_bytes: int | None, *, enforce: bool = True) -> int:
        self._budget_bytes = memory_limit_bytes
        self._enforced = enforce
        return (
            self.capacity_bytes
            if memory_limit_bytes is None
            else min(memory_limit_bytes, self.capacity_bytes)
        )

    def release_budget(self) -> None:
        self._budget_bytes = None
        self._enforced = False

    @property
    def under_limit(self) -> bool:
        return self._enforced and self._budget_bytes is not None

    def reset_peak(self) -> None:
        self.peak_allocated_bytes = self.allocated_bytes

    def synchronize(self) -> None:
        return None

    def read(self) -> MemoryReading:
        return MemoryReading(
            peak_bytes=self.peak_allocated_bytes,
            peak_allocated_bytes=self.peak_allocated_bytes,
            device_used_bytes=self.allocated_bytes,
            device_total_bytes=self.capacity_bytes,
        )

    def describe(self) -> dict[str, Any]:
        return {"kind": "fake", "name": "fake", "total_bytes": self.capacity_bytes}
