"""How much memory this process may use: the host's RAM and its cgroups' limits (Linux).

A container's memory limit is a cgroup's: v2 ``memory.max`` (``memory.current`` in use) or
v1 ``memory.limit_in_bytes`` (``memory.usage_in_bytes``). The process's own cgroup comes from
/proc/self/cgroup; its ancestors up to the mount point are read too, since a parent's limit
binds its children (a systemd slice, a Kubernetes pod around its container). ``"max"`` (v2)
and v1's "unlimited" (the largest page-aligned long, 9223372036854771712 with 4 KiB pages)
mean no limit.

The mount points come from /proc/self/mountinfo (v1 and v2 can both be mounted, as here:
v1's memory controller at /sys/fs/cgroup/memory, v2 at /sys/fs/cgroup/unified). For tests,
``BSFINDER_CGROUP_ROOT`` (or ``cgroup_root=``) replaces them: v2 at the root, v1's memory
controller at ``ROOT/memory``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# imported with the CPU backend, so before any budget: measured, importing psutil inside a
# trial process under a nearly spent budget died of MemoryError in ``CpuBackend.describe``
import psutil

from bsfinder.units import format_bytes

__all__ = ["CGROUP_ROOT_ENV", "MemoryBound", "cgroup_bounds", "memory_bounds"]

#: for tests: a directory that stands in for the cgroup mounts (see the module docstring)
CGROUP_ROOT_ENV = "BSFINDER_CGROUP_ROOT"
#: v1 reports "no limit" as PAGE_COUNTER_MAX pages: 2**63 less a page, whatever the page size
_V1_UNLIMITED = 2**62


@dataclass(frozen=True)
class MemoryBound:
    """One bound on this process's memory: the host's RAM, or one cgroup's limit.

    Attributes:
        kind: ``"host"``, ``"cgroup v2"`` or ``"cgroup v1"``.
        path: the cgroup's directory (empty for the host).
        limit_bytes: the host's total RAM, or the cgroup's limit.
        available_bytes: what can still be allocated under it now: the host's available RAM,
            or the limit minus the cgroup's use (page cache the kernel would reclaim first,
            ``inactive_file`` in ``memory.stat``, is not counted as use, as the kubelet's
            working set does not count it).
    """

    kind: str
    path: str
    limit_bytes: int
    available_bytes: int

    def describe(self) -> str:
        """What this bound is, for "90% of ..." (e.g. "the available RAM")."""
        if self.kind == "host":
            return "the available RAM"
        return (
            f"the container's memory limit ({format_bytes(self.limit_bytes)}, {self.kind} "
            f"{self.path}) minus its use"
        )


def memory_bounds(
    *, proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup", cgroup_root: str | None = None
) -> list[MemoryBound]:
    """The host's RAM, then every cgroup limit on this process (innermost first)."""
    memory = psutil.virtual_memory()
    host = MemoryBound("host", "", int(memory.total), int(memory.available))
    return [host, *cgroup_bounds(proc_cgroup=proc_cgroup, cgroup_root=cgroup_root)]


def cgroup_bounds(
    *, proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup", cgroup_root: str | None = None
) -> list[MemoryBound]:
    """The memory limits of this process's cgroups (v2 and v1) and their ancestors.

    ``cgroup_root``: a directory that stands in for the mounts (default: the environment's
    ``BSFINDER_CGROUP_ROOT``, else the real mounts from /proc/self/mountinfo). Unreadable or
    missing files mean no limit there.
    """
    paths = _own_cgroups(Path(proc_cgroup))
    if not paths:
        return []
    root = cgroup_root if cgroup_root is not None else os.environ.get(CGROUP_ROOT_ENV) or None
    if root is not None:
        mounts = {"v2": [(Path(root), "/")], "v1": [(Path(root) / "memory", "/")]}
    else:
        mounts = _mounts()
    bounds: list[MemoryBound] = []
    for version, files in (("v2", ("memory.max", "memory.current")),
                           ("v1", ("memory.limit_in_bytes", "memory.usage_in_bytes"))):  # fmt: skip
        if version not in paths:
            continue
        for mount, mount_root in mounts.get(version, []):
            directory = _inside(mount, mount_root, paths[version])
            if directory is None:
                continue
            for level in _up_to(directory, mount):
                bound = _read_level(level, version, *files)
                if bound is not None:
                    bounds.append(bound)
            break  # the first mount that holds the cgroup (bind mounts repeat it)
    return bounds


def _own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """``{"v2": path, "v1": path}`` from /proc/self/cgroup (v1: the memory controller's)."""
    try:
        text = proc_cgroup.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    found: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            found["v2"] = path
        elif "memory" in controllers.split(","):
            found["v1"] = path
    return found


def _mounts(mountinfo: str = "/proc/self/mountinfo") -> dict[str, list[tuple[Path, str]]]:
    """Cgroup mount points and the cgroup each shows at its top, by version."""
    mounts: dict[str, list[tuple[Path, str]]] = {"v2": [], "v1": []}
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        # ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        point = Path(fields[4].replace("\\040", " "))
        if tail[0] == "cgroup2":
            mounts["v2"].append((point, fields[3]))
        elif tail[0] == "cgroup" and "memory" in tail[2].split(","):
            mounts["v1"].append((point, fields[3]))
    if not lines:  # no mountinfo: the usual places
        base = Path("/sys/fs/cgroup")
        mounts = {"v2": [(base, "/"), (base / "unified", "/")], "v1": [(base / "memory", "/")]}
    return mounts


def _inside(mount: Path, mount_root: str, cgroup: str) -> Path | None:
    """The directory of ``cgroup`` under a mount that shows ``mount_root`` at its top.

    When it is not visible there (a container's own mount of its cgroup, with the host's
    path in /proc/self/cgroup), the mount point itself: the closest visible ancestor.
    """
    if not mount.is_dir():
        return None
    root = mount_root.rstrip("/")
    if root and (cgroup == root or cgroup.startswith(root + "/")):
        cgroup = cgroup[len(root) :]
    directory = mount / cgroup.lstrip("/")
    return directory if directory.is_dir() else mount


def _up_to(directory: Path, mount: Path) -> list[Path]:
    """``directory`` and its parents up to and including ``mount``."""
    levels = [directory]
    while directory != mount and mount in directory.parents:
        directory = directory.parent
        levels.append(directory)
    return levels


def _read_level(
    directory: Path, version: str, limit_file: str, usage_file: str
) -> MemoryBound | None:
    """The bound one cgroup sets, or None when it sets none (no file, "max", v1's sentinel)."""
    limit = _read_int(directory / limit_file)
    if limit is None or limit >= _V1_UNLIMITED:
        return None
    usage = _read_int(directory / usage_file) or 0
    stat = _stat(directory / "memory.stat")
    reclaimable = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    used = max(0, usage - min(reclaimable, usage))
    return MemoryBound(f"cgroup {version}", str(directory), limit, max(0, limit - used))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        return int(text)
    except ValueError:
        return None  # v2's "max" (no limit), or something unreadable: no bound from it


def _stat(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return values
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values
