"""What ``bsfinder devices`` lists: the CPU with its RAM, and every visible CUDA device."""

from __future__ import annotations

import os
import platform
from typing import Any

__all__ = ["list_devices"]


def list_devices() -> list[dict[str, Any]]:
    """One dict per device: ``device``, ``name``, ``total_bytes`` and what else is known."""
    import psutil
    import torch

    memory = psutil.virtual_memory()
    found: list[dict[str, Any]] = [
        {
            "device": "cpu",
            "name": platform.processor() or platform.machine(),
            "total_bytes": memory.total,
            "available_bytes": memory.available,
            "logical_cores": os.cpu_count(),
        }
    ]
    if not torch.cuda.is_available():
        found[0]["note"] = f"no CUDA device visible (torch {torch.__version__})"
        return found
    from bsfinder.devices._nvml import nvml_device_info
    from bsfinder.devices.cuda import cuda_uuid

    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        uuid = cuda_uuid(index)
        found.append(
            {
                "device": f"cuda:{index}",
                "name": props.name,
                "total_bytes": props.total_memory,
                "uuid": uuid,
                **nvml_device_info(uuid),
            }
        )
    return found
