"""Device backends behind one small interface."""

from bsfinder.devices.base import DeviceBackend, MemoryReading, backend_for, resolve_device

__all__ = ["DeviceBackend", "MemoryReading", "backend_for", "resolve_device"]
