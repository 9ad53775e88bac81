"""Device backends behind one small interface: cpu, cuda, and a fake for logic tests.

From bsfinder, only :mod:`bsfinder.errors` and :mod:`bsfinder.units` are imported here
(tests/test_layout.py pins it): a backend knows nothing of trials, runners or results.
"""

from bsfinder.devices.base import DeviceBackend, MemoryReading
from bsfinder.devices.select import backend_for, resolve_device

__all__ = ["DeviceBackend", "MemoryReading", "backend_for", "resolve_device"]
