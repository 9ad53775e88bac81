"""Which backend runs a device string: ``auto``/``cpu``/``cuda:N`` resolved, then built.

Apart from :mod:`bsfinder.devices.base` so that the backends, which import the base, are
imported by nobody they import (the base imported them back, lazily, before).
"""

from __future__ import annotations

import os

from bsfinder.devices.base import DeviceBackend
from bsfinder.errors import SpecError

__all__ = ["backend_for", "resolve_device"]


def resolve_device(text: str) -> str:
    """Turn ``auto``, ``cpu``, ``cuda``, ``cuda:N`` into a concrete torch device string.

    Raises:
        SpecError: the device is unknown or not available here.
    """
    value = text.strip().lower()
    if value == "cpu" or (value == "auto" and not _gpu_nodes()):
        return "cpu"  # without importing torch (a second of the probe's start on 2 cores)
    import torch

    if value == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
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


#: device nodes of a GPU that torch.cuda could use: NVIDIA's driver, ROCm's, WSL's
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def _gpu_nodes() -> bool:
    """Whether this machine shows any GPU device node (none: ``auto`` is the CPU)."""
    return any(os.path.exists(node) for node in _GPU_NODES)


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
