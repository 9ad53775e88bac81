"""NVML, wrapped once: lazy init, shutdown at exit, one query point, devices matched by UUID."""

from __future__ import annotations

import atexit
from typing import Any

__all__ = ["nvml_device_info", "nvml_memory", "nvml_process_memory"]

_state: dict[str, Any] = {"ready": None}


def _nvml() -> Any | None:
    if _state["ready"] is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            atexit.register(pynvml.nvmlShutdown)
            _state["ready"] = pynvml
        except Exception:
            _state["ready"] = False
    return _state["ready"] or None


def _handle(uuid: str) -> Any | None:
    nvml = _nvml()
    if nvml is None or not uuid:
        return None
    key = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    try:
        return nvml.nvmlDeviceGetHandleByUUID(key)
    except Exception:
        return None


def nvml_memory(uuid: str) -> tuple[int, int] | None:
    """Device memory ``(used_bytes, total_bytes)`` as the driver sees it, or None."""
    handle = _handle(uuid)
    if handle is None:
        return None
    try:
        info = _nvml().nvmlDeviceGetMemoryInfo(handle)  # type: ignore[union-attr]
    except Exception:  # NVML "not supported" (some vGPUs), a lost device: unknown, not fatal
        return None
    return int(info.used), int(info.total)


def nvml_process_memory(uuid: str, pid: int) -> int | None:
    """Device memory one process uses, as the driver sees it (None if NVML cannot tell,
    e.g. in a container whose PIDs NVML does not see)."""
    handle = _handle(uuid)
    if handle is None:
        return None
    try:
        processes = _nvml().nvmlDeviceGetComputeRunningProcesses(handle)  # type: ignore[union-attr]
    except Exception:
        return None
    for process in processes:
        if process.pid == pid and process.usedGpuMemory is not None:
            return int(process.usedGpuMemory)
    return None


def nvml_device_info(uuid: str) -> dict[str, Any]:
    """Name, driver version, memory and utilisation of one device (empty without NVML)."""
    handle = _handle(uuid)
    nvml = _nvml()
    if handle is None or nvml is None:
        return {}
    info: dict[str, Any] = {}
    try:
        name = nvml.nvmlDeviceGetName(handle)
        info["nvml_name"] = name.decode() if isinstance(name, bytes) else name
        driver = nvml.nvmlSystemGetDriverVersion()
        info["driver_version"] = driver.decode() if isinstance(driver, bytes) else driver
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        info["nvml_used_bytes"] = int(memory.used)
        info["nvml_total_bytes"] = int(memory.total)
        info["utilization_percent"] = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        info["power_watts"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000
    except Exception:
        pass
    return info
