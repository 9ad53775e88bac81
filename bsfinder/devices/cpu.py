"""CPU backend: a real memory budget through the address-space limit (Linux).

The worker sets ``RLIMIT_AS`` to its baseline address space plus the budget, after torch's
thread pools exist (creating a thread under the limit can abort the process). An allocation
past the budget then fails inside torch with the allocator's own error
(``DefaultCPUAllocator: can't allocate memory``), which is what a smaller machine would do,
and the machine itself never swaps or meets the kernel's OOM killer.
"""

from __future__ import annotations

import os
import platform
import resource
from typing import Any

from bsfinder.devices._cgroup import memory_bounds
from bsfinder.devices.base import DeviceBackend, MemoryReading

__all__ = [
    "CpuBackend",
    "allocator_env",
    "default_cpu_budget",
    "populate_writable",
    "read_proc_status",
    "settled_address_space",
]

#: glibc settings the worker runs with unless the user's environment sets them. A fixed mmap
#: threshold stops glibc from raising it dynamically after frees (up to 32 MiB), which keeps
#: freed activations in the heap and changes the largest batch by tens of percent (measured:
#: 2048 vs 4096 for one MLP under 512 MiB). One arena stops threads that first allocate late
#: from reserving 64 MiB of address space each at a moment that depends on scheduling.
#: CPython's own allocator reserves 1 MiB arenas at moments that differ from process to
#: process: measured, the same trial's peak address space was 87648 or 88676 KiB depending on
#: the process, and 88676 KiB in 8 of 8 with ``PYTHONMALLOC=malloc``.
#: MKL's "fast memory manager" keeps the GEMM packing buffers of earlier calls: measured,
#: 16-40 MiB of a trial's peak that no tensor holds, varying with the model and batch
#: (with it off: about 1 MiB), at no measurable cost in step time.
DEFAULT_ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_ARENA_MAX": "1",
    "PYTHONMALLOC": "malloc",
    "MKL_DISABLE_FAST_MM": "1",
}
_GLIBC_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")
ALLOCATOR_KEYS = (
    "PYTHONMALLOC",
    "MKL_DISABLE_FAST_MM",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
)


def allocator_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The allocator variables a CPU worker should run with: the user's, else our defaults."""
    environ = dict(os.environ if environ is None else environ)
    chosen = {k: environ[k] for k in ALLOCATOR_KEYS if k in environ}
    for key, value in DEFAULT_ALLOCATOR_ENV.items():
        if key in _GLIBC_KEYS and "GLIBC_TUNABLES" in chosen:
            continue  # the user tunes glibc's allocator their own way
        chosen.setdefault(key, value)
    return chosen


def read_proc_status(path: str = "/proc/self/status") -> dict[str, int]:
    """``Vm*`` fields of /proc/self/status (or another process's) in bytes (empty off Linux
    or when the process is gone)."""
    values: dict[str, int] = {}
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key.startswith("Vm") and rest.strip().endswith("kB"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


#: the default budget's share of what the host and the process's cgroups leave free
DEFAULT_BUDGET_FRACTION = 0.9
#: the smallest CPU budget accepted. The budget limits address space, which counts a new
#: thread's 8 MiB stack (``ulimit -s``) and ~1 MiB per oneDNN convolution primitive
#: (estimate.py); even SmallCNN at 3x8x8 and batch 1 peaks at 5.6 MiB. Measured: at 1 MiB
#: (1.2-1.7 MiB), SmallCNN's trial process died of a MemoryError in bsfinder's own
#: bookkeeping (importing psutil: now imported before the budget, see ``_cgroup``). Below
#: this, the answer says more about torch and bsfinder than about the model.
MIN_CPU_BUDGET = 16 * 2**20


def default_cpu_budget(
    *, proc_cgroup: str = "/proc/self/cgroup", cgroup_root: str | None = None
) -> int:
    """90% of the memory available now: a budget that cannot push this machine into swap
    nor its container into the kernel's OOM killer (see :func:`cpu_budget_default`)."""
    return cpu_budget_default(proc_cgroup=proc_cgroup, cgroup_root=cgroup_root)[0]


def cpu_budget_default(
    *, share: int = 1, proc_cgroup: str = "/proc/self/cgroup", cgroup_root: str | None = None
) -> tuple[int, str]:
    """The default CPU budget and what set it ("90% of the available RAM"): the one place
    it is decided (the probe settles it once, and the CLI shows this text).

    90% of the least of: the host's available RAM, and for this process's cgroup and each
    ancestor (v2 ``memory.max`` minus ``memory.current``, v1 ``memory.limit_in_bytes`` minus
    ``memory.usage_in_bytes``); ``share``: the ranks on this node, which share it equally.
    ``proc_cgroup``/``cgroup_root`` (or the environment's ``BSFINDER_CGROUP_ROOT``): where
    to read them, for tests (see ``devices/_cgroup.py``).
    """
    bounds = memory_bounds(proc_cgroup=proc_cgroup, cgroup_root=cgroup_root)
    tightest = min(bounds, key=lambda b: b.available_bytes)
    budget = int(tightest.available_bytes * DEFAULT_BUDGET_FRACTION)
    source = f"{DEFAULT_BUDGET_FRACTION:.0%} of {tightest.describe()}"
    if share > 1:
        source += f", shared by the {share} ranks on this node"
    return budget // share, source


def check_cpu_budget(
    memory_limit_bytes: int,
    *,
    proc_cgroup: str = "/proc/self/cgroup",
    cgroup_root: str | None = None,
) -> None:
    """Refuse a CPU budget that no trial can use: below :data:`MIN_CPU_BUDGET`, or above
    the host's RAM or a cgroup's limit (the address-space limit would never bind, and
    ``setrlimit`` overflows past 2**63 bytes).

    Raises:
        SpecError: the budget is out of that range; the message gives the range.
    """
    from bsfinder.errors import SpecError
    from bsfinder.units import format_bytes

    if memory_limit_bytes < MIN_CPU_BUDGET:
        raise SpecError(
            f"memory limit {format_bytes(memory_limit_bytes)} is too small for a CPU training "
            f"step: the smallest CPU budget is {format_bytes(MIN_CPU_BUDGET)} (thread stacks and "
            "oneDNN's kernels alone count several MiB of address space)"
        )
    bounds = memory_bounds(proc_cgroup=proc_cgroup, cgroup_root=cgroup_root)
    tightest = min(bounds, key=lambda b: b.limit_bytes)
    if memory_limit_bytes > tightest.limit_bytes:
        what = (
            "this machine's RAM"
            if tightest.kind == "host"
            else f"this container's memory limit ({tightest.kind} {tightest.path})"
        )
        default, source = cpu_budget_default(proc_cgroup=proc_cgroup, cgroup_root=cgroup_root)
        raise SpecError(
            f"memory limit {format_bytes(memory_limit_bytes)} is more than a CPU probe here can "
            f"use: at most {format_bytes(tightest.limit_bytes)} ({what}); the default "
            f"budget is {format_bytes(default)} ({source})"
        )


class CpuBackend(DeviceBackend):
    """Budget through RLIMIT_AS; peaks from /proc (address space and RSS).

    In a worker, the peak is the peak address space above the baseline (exactly what the
    limit counts), which cannot be reset within a process: ``peak_resettable`` is False and
    the runner restarts the worker before a smaller batch. In-process (``in_process=True``)
    the process's address-space history is the user's, so the peak is the resident set above
    the baseline, which can be reset.
    """

    name = "cpu"

    def __init__(self, *, in_process: bool = False) -> None:
        self.in_process = in_process
        self.peak_resettable = in_process
        self._baseline_vm: int | None = None
        self._baseline_rss: int | None = None
        self._saved_limit: tuple[int, int] | None = None
        self._budget: int | None = None
        self._enforced = False

    def apply_budget(
        self, memory_limit_bytes: int | None, *, enforce: bool = True, held_bytes: int = 0
    ) -> int:
        """Limit this process's address space to its baseline plus the budget.

        ``held_bytes``: memory the process already holds that is the trial's own, left out
        of the baseline so that the budget counts it: the weights a fork server built before
        forking (a training process holds its weights in its own memory; measured, the same
        batches fit and the same peaks come out as when the trial builds them under the
        limit, see tests/test_build_once.py).
        """
        _warm_up_threads()
        _release_free_memory()
        status = read_proc_status()
        vm, rss = status.get("VmSize"), status.get("VmRSS")
        self._baseline_vm = None if vm is None else max(0, vm - held_bytes)
        self._baseline_rss = None if rss is None else max(0, rss - held_bytes)
        # a probe decides its budget once (execution/placement.py, shared by a node's ranks)
        # and always passes it; None is for a backend used on its own (scratch, a test)
        budget = memory_limit_bytes if memory_limit_bytes is not None else default_cpu_budget()
        self._budget = budget
        if enforce and self._baseline_vm is not None:
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            self._saved_limit = (soft, hard)
            limit = self._baseline_vm + budget
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
            self._enforced = True
        return budget

    def release_budget(self) -> None:
        if self._saved_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, self._saved_limit)
            self._saved_limit = None
        self._enforced = False

    @property
    def under_limit(self) -> bool:
        return self._enforced

    def reset_peak(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")  # resets VmHWM, the peak RSS
        except OSError:
            pass

    def synchronize(self) -> None:
        return None

    def read(self) -> MemoryReading:
        status = read_proc_status()
        peak_vm = status.get("VmPeak")
        peak_bytes = None
        if peak_vm is not None and self._baseline_vm is not None:
            peak_bytes = max(0, peak_vm - self._baseline_vm)
        if self.in_process and self._baseline_rss is not None and "VmHWM" in status:
            peak_bytes = max(0, status["VmHWM"] - self._baseline_rss)
        return MemoryReading(peak_bytes=peak_bytes, peak_rss_bytes=status.get("VmHWM"))

    def describe(self) -> dict[str, Any]:
        import psutil
        import torch

        memory = psutil.virtual_memory()
        return {
            "kind": "cpu",
            "name": platform.processor() or platform.machine(),
            "device": "cpu",
            "logical_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "total_bytes": memory.total,
            "available_bytes": memory.available,
            "budget_bytes": self._budget,
            "baseline_address_space_bytes": self._baseline_vm,
            "baseline_rss_bytes": self._baseline_rss,
            "budget_enforced": self._enforced,
            "peak_measure": "rss" if self.in_process else "address-space",
        }


#: madvise(2)'s MADV_POPULATE_WRITE (Linux 5.14)
_MADV_POPULATE_WRITE = 23


def populate_writable(ranges: list[tuple[int, int]]) -> bool:
    """Make the pages of ``ranges`` (address, bytes) this process's own now, contents
    unchanged (``MADV_POPULATE_WRITE``); False where the kernel cannot (then they are
    copied at the first write, as before).

    After a fork, memory inherited copy-on-write is copied a page at a time at the first
    write; when that write comes from several threads (an optimizer step), each copy also
    flushes the other threads' TLBs. Measured on this 2-core VM, 2 GiB of inherited weights:
    the first SGD step took 3.4-4.1 s instead of 0.6 s; populated first, from one thread,
    0.9 s, and the step 0.6 s. Call it before the process starts its thread pool.
    """
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for address, nbytes in ranges:
        start = address - address % page
        end = -(-(address + nbytes) // page) * page
        if madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
            return False
    return True


def settled_address_space() -> int | None:
    """This process's address space once garbage is collected and free heap is returned to
    the OS (bytes; None off Linux): what it holds, as the budget would count it."""
    _release_free_memory()
    return read_proc_status().get("VmSize")


def _release_free_memory() -> None:
    """Return garbage and free heap to the OS, so that the baseline holds live memory only.

    Memory the process freed but kept would count in the baseline and then be reused by the
    trial without counting against the budget.
    """
    import contextlib
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL(name).malloc_trim(0)


def _warm_up_threads() -> None:
    """Create torch's intra-op pool and autograd state before any limit is set."""
    import torch

    a = torch.randn(256, 256, requires_grad=True)
    (a @ a).relu().sum().backward()
    conv = torch.nn.Conv2d(3, 4, 3)
    conv(torch.randn(2, 3, 16, 16)).sum().backward()
    torch.randn(1 << 16).sort()
