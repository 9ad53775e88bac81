"""Device backends behind one small interface, plus a public fake for logic tests."""

from bsfinder.devices.base import DeviceBackend, MemoryReading, backend_for, resolve_device
from bsfinder.devices.fake import FakeDevice

__all__ = ["DeviceBackend", "FakeDevice", "MemoryReading", "backend_for", "resolve_device"]
