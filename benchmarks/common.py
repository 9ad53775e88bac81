"""What every benchmark records: machine, versions, commit; and a fresh-process check."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def header() -> dict[str, Any]:
    """Machine, software and commit, so that a result says where it comes from."""
    import psutil
    import torch

    import bsfinder

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "bsfinder": bsfinder.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": commit,
        "dirty": dirty,
    }


def fresh_fits(
    spec: Any, batch: int, budget: int | None, device: str = "cpu", steps: int = 1
) -> bool:
    """Does ``batch`` train in a brand-new process under ``budget``? (one trial, nothing else)"""
    from bsfinder.execution.process import check_batch

    return check_batch(spec, batch, device=device, memory_limit_bytes=budget, steps=steps).fits
