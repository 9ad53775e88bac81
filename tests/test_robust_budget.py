"""The default CPU budget respects containers: cgroup v2 and v1 limits, read from files the
tests provide (a cgroup root and a /proc/self/cgroup of their own)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil
import pytest

from bsfinder import SpecError
from bsfinder.devices._cgroup import CGROUP_ROOT_ENV, _inside, _mounts, cgroup_bounds
from bsfinder.devices.cpu import (
    MIN_CPU_BUDGET,
    check_cpu_budget,
    cpu_budget_default,
    default_cpu_budget,
)

MiB = 2**20
#: what cgroup v1 writes for "no limit" with 4 KiB pages
V1_UNLIMITED = "9223372036854771712"


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def _proc(tmp_path: Path, text: str) -> str:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return str(path)


def _default(proc: str, root: Path) -> tuple[int, str]:
    return cpu_budget_default(proc_cgroup=proc, cgroup_root=str(root))


def test_v2_limit_minus_its_use_sets_the_default(tmp_path: Path) -> None:
    # GIVEN a container (cgroup v2) limited to 256 MiB that uses 56 MiB
    root = _tree(tmp_path / "cg", {
        "kubepods/pod1/ctr/memory.max": str(256 * MiB),
        "kubepods/pod1/ctr/memory.current": str(56 * MiB),
    })  # fmt: skip
    proc = _proc(tmp_path, "0::/kubepods/pod1/ctr\n")
    # WHEN the default budget is decided
    budget, source = _default(proc, root)
    # THEN it is 90% of what the container leaves, not of the host's RAM, and says so
    assert budget == int(0.9 * 200 * MiB)
    assert source.startswith("90% of the container's memory limit (256 MiB, cgroup v2")
    assert source.endswith("minus its use")
    assert default_cpu_budget(proc_cgroup=proc, cgroup_root=str(root)) == budget


def test_v2_max_is_no_limit(tmp_path: Path) -> None:
    root = _tree(tmp_path / "cg", {"ctr/memory.max": "max", "ctr/memory.current": str(MiB)})
    proc = _proc(tmp_path, "0::/ctr\n")
    assert cgroup_bounds(proc_cgroup=proc, cgroup_root=str(root)) == []
    budget, source = _default(proc, root)
    assert source == "90% of the available RAM"
    # the host's available RAM moves while the test runs: within 10%
    assert budget == pytest.approx(0.9 * psutil.virtual_memory().available, rel=0.1)


def test_v2_parent_limit_binds_a_child_without_one(tmp_path: Path) -> None:
    # GIVEN a pod limited to 300 MiB (100 MiB used) around a container without a limit
    root = _tree(tmp_path / "cg", {
        "kubepods/pod1/memory.max": str(300 * MiB),
        "kubepods/pod1/memory.current": str(100 * MiB),
        "kubepods/pod1/ctr/memory.max": "max",
        "kubepods/pod1/ctr/memory.current": str(90 * MiB),
    })  # fmt: skip
    proc = _proc(tmp_path, "0::/kubepods/pod1/ctr\n")
    bounds = cgroup_bounds(proc_cgroup=proc, cgroup_root=str(root))
    assert [b.path for b in bounds] == [str(root / "kubepods/pod1")]
    budget, source = _default(proc, root)
    assert budget == int(0.9 * 200 * MiB) and "300 MiB" in source


def test_v2_the_tightest_level_wins_and_page_cache_is_not_use(tmp_path: Path) -> None:
    # GIVEN a child limited to 512 MiB with 412 MiB in use, of which 200 MiB is page cache
    # the kernel reclaims before it OOM-kills, under a parent at 1 GiB using 600 MiB
    root = _tree(tmp_path / "cg", {
        "a/memory.max": str(1024 * MiB),
        "a/memory.current": str(600 * MiB),
        "a/b/memory.max": str(512 * MiB),
        "a/b/memory.current": str(412 * MiB),
        "a/b/memory.stat": f"anon {200 * MiB}\ninactive_file {200 * MiB}\nactive_file 0",
    })  # fmt: skip
    proc = _proc(tmp_path, "0::/a/b\n")
    available = {
        b.path: b.available_bytes for b in cgroup_bounds(proc_cgroup=proc, cgroup_root=str(root))
    }
    assert available == {str(root / "a/b"): 300 * MiB, str(root / "a"): 424 * MiB}
    assert _default(proc, root)[0] == int(0.9 * 300 * MiB)


def test_v1_limit_minus_usage(tmp_path: Path) -> None:
    root = _tree(tmp_path / "cg", {
        "memory/docker/abc/memory.limit_in_bytes": str(256 * MiB),
        "memory/docker/abc/memory.usage_in_bytes": str(56 * MiB),
    })  # fmt: skip
    proc = _proc(tmp_path, "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    bounds = cgroup_bounds(proc_cgroup=proc, cgroup_root=str(root))
    assert [(b.kind, b.limit_bytes, b.available_bytes) for b in bounds] == [
        ("cgroup v1", 256 * MiB, 200 * MiB)
    ]
    budget, source = _default(proc, root)
    assert budget == int(0.9 * 200 * MiB) and "cgroup v1" in source


def test_v1_unlimited_sentinel_is_no_limit(tmp_path: Path) -> None:
    root = _tree(tmp_path / "cg", {
        "memory/docker/abc/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/docker/abc/memory.usage_in_bytes": str(56 * MiB),
        "memory/memory.limit_in_bytes": V1_UNLIMITED,
    })  # fmt: skip
    proc = _proc(tmp_path, "4:memory:/docker/abc\n")
    assert cgroup_bounds(proc_cgroup=proc, cgroup_root=str(root)) == []
    assert _default(proc, root)[1] == "90% of the available RAM"


def test_no_cgroup_files_means_the_host_alone(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = str(tmp_path / "no-such-proc-file")
    assert cgroup_bounds(proc_cgroup=missing, cgroup_root=str(empty)) == []
    assert cgroup_bounds(proc_cgroup=_proc(tmp_path, "0::/x\n"), cgroup_root=str(empty)) == []
    assert _default(missing, empty)[1] == "90% of the available RAM"


def test_the_environment_variable_replaces_the_mounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree(tmp_path / "cg", {"memory.max": str(256 * MiB), "memory.current": "0"})
    monkeypatch.setenv(CGROUP_ROOT_ENV, str(root))
    # the process's cgroup path is not under the fake root: its top stands for it
    bounds = cgroup_bounds(proc_cgroup=_proc(tmp_path, "0::/user.slice/session-1.scope\n"))
    assert [(b.path, b.limit_bytes) for b in bounds] == [(str(root), 256 * MiB)]


def test_mountinfo_finds_hybrid_mounts_and_their_roots(tmp_path: Path) -> None:
    # GIVEN a hybrid host's mountinfo (v1 memory, v2 unified) and a container's v1 mount
    # that shows its own cgroup (/docker/abc) at its top, as with the host's cgroup namespace
    info = tmp_path / "mountinfo"
    info.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    mounts = _mounts(str(info))
    assert mounts == {
        "v2": [(Path("/sys/fs/cgroup/unified"), "/")],
        "v1": [(Path("/sys/fs/cgroup/memory"), "/docker/abc")],
    }
    # THEN /proc/self/cgroup's /docker/abc is that mount's top, and /docker/abc/x below it
    mount = tmp_path / "memory"
    (mount / "x").mkdir(parents=True)
    assert _inside(mount, "/docker/abc", "/docker/abc") == mount
    assert _inside(mount, "/docker/abc", "/docker/abc/x") == mount / "x"
    assert _inside(tmp_path / "absent", "/", "/x") is None


def test_this_machine_reads_without_error() -> None:
    # the real files (whatever this host has): a budget, and a bound it came from
    budget, source = cpu_budget_default()
    assert 0 < budget <= psutil.virtual_memory().total and source.startswith("90% of ")


def test_a_budget_is_checked_against_the_container_and_a_minimum(tmp_path: Path) -> None:
    root = _tree(tmp_path / "cg", {"memory.max": str(256 * MiB), "memory.current": "0"})
    paths = {"proc_cgroup": _proc(tmp_path, "0::/\n"), "cgroup_root": str(root)}
    check_cpu_budget(200 * MiB, **paths)
    check_cpu_budget(MIN_CPU_BUDGET, **paths)
    with pytest.raises(SpecError, match=r"at most 256 MiB \(this container's memory limit"):
        check_cpu_budget(1024 * MiB, **paths)
    with pytest.raises(SpecError, match=r"smallest CPU budget is 16\.0 MiB"):
        check_cpu_budget(MIN_CPU_BUDGET - 1, **paths)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS budget is Linux")
def test_the_cli_in_a_512_mib_container_gets_90_percent_of_what_it_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    # GIVEN cgroup files of a container limited to 512 MiB that uses 100 MiB
    root = _tree(tmp_path / "cg", {
        "memory.max": str(512 * MiB), "memory.current": str(100 * MiB),
    })  # fmt: skip
    out = tmp_path / "r.json"
    monkeypatch.setenv(CGROUP_ROOT_ENV, str(root))  # the CLI and its worker read it
    # WHEN the CLI probes without --memory-limit
    done = cli("probe", "bsfinder.examples:SmallCNN", "--input", "3x8x8", "--max-batch", "2",
               "--device", "cpu", "--steps", "1", "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    # THEN its budget is 90% of the container's 412 MiB left, and it says what set it
    data = json.loads(out.read_text())
    assert data["capacity_bytes"] == int(0.9 * 412 * MiB)
    assert "budget 371 MiB" in done.stderr
    assert "90% of the container's memory limit (512 MiB, cgroup v2" in done.stderr
