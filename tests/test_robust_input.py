"""Bad input is one line and exit 2, before any trial runs; ``--json -`` is JSON alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bsfinder import FakeRunner, ProbeSettings, SpecError, UserCodeError, find_batch_size
from bsfinder.cli import main
from bsfinder.cli._output import _check_output
from bsfinder.devices.cpu import CpuBackend
from bsfinder.execution.trial import execute_trial
from bsfinder.probe import run_probe
from bsfinder.units import parse_bytes
from bsfinder.workload.loading import InputSpec, parse_input_spec
from bsfinder.workload.step import Workload, WorkloadSpec
from tests.conftest import ROOT

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux budget")


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _one_line_exit_2(code: int, stdout: str, stderr: str, needle: str) -> None:
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert needle in stderr
    assert "Traceback" not in stdout + stderr


@pytest.fixture
def good_result(tmp_path: Path) -> Path:
    dev = FakeRunner(capacity_bytes=2**20, fixed_bytes=2**16, per_sample_bytes=1000)
    path = tmp_path / "good.json"
    run_probe(dev, ProbeSettings()).save(path)
    return path


@pytest.fixture
def marker_model(tmp_path: Path) -> tuple[str, Path]:
    """A model file that leaves a marker when imported: proof that no work started."""
    marker = tmp_path / "imported"
    model = tmp_path / "marked.py"
    model.write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from bsfinder.examples import SmallCNN\n"
    )
    return f"{model}:SmallCNN", marker


# -- compare / report on files that are not results ------------------------------------------
NOT_RESULTS = {
    "a JSON list": ([1, 2], "the JSON is a list, not an object"),
    "trials that are not objects": (
        {"schema_version": 3, "trials": [1, 2], "recommendations": {}},
        "trial 0 is a number, not an object",
    ),
    "trials that are a string": (
        {"schema_version": 3, "trials": "abc", "recommendations": {}},
        "'trials' is a string, not a list of trials",
    ),
    "recommendations that are a list": (
        {"schema_version": 3, "trials": [], "recommendations": []},
        "'recommendations' is a list, not an object",
    ),
    "a trial whose batch is text": (
        {
            "schema_version": 3,
            "trials": [{"batch_size": "x", "fits": True}],
            "recommendations": {},
        },
        "trial 0: 'batch_size' is 'x', not a positive integer",
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_RESULTS))
@pytest.mark.parametrize("command", ["report", "compare"])
def test_compare_and_report_refuse_what_is_not_a_result(
    tmp_path: Path, good_result: Path, case: str, command: str
) -> None:
    data, needle = NOT_RESULTS[case]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    args = [str(bad)] if command == "report" else [str(good_result), str(bad)]
    code, out, err = _invoke(command, *args)
    _one_line_exit_2(code, out, err, "is not a bsfinder probe result: " + needle)


# -- output paths, checked before any work ---------------------------------------------------
def _unwritable(tmp_path: Path) -> dict[str, tuple[str, str]]:
    afile = tmp_path / "afile"
    afile.write_text("")
    adir = tmp_path / "adir"
    adir.mkdir()
    cases = {
        "a directory": (str(adir), "is a directory"),
        "under a file": (str(afile / "x.out"), "is not a directory"),
    }
    if sys.platform.startswith("linux"):  # not even root can create a file in /proc
        cases["in /proc"] = ("/proc/bsfinder-test.out", "cannot write in '/proc'")
    return cases


@pytest.mark.parametrize("case", ["a directory", "under a file", "in /proc"])
def test_an_unwritable_output_is_refused_before_any_work(
    tmp_path: Path, marker_model: tuple[str, Path], good_result: Path, case: str
) -> None:
    cases = _unwritable(tmp_path)
    if case not in cases:
        pytest.skip("no /proc here")
    path, needle = cases[case]
    model, marker = marker_model
    work = ["--input", "3x8x8", "--device", "cpu"]
    commands = [
        ("--json", ["probe", model, *work, "--memory-limit", "256MiB", "--json", path]),
        ("--plot", ["probe", model, *work, "--memory-limit", "256MiB", "--json", "",
                    "--plot", path]),
        ("--json", ["profile", model, *work, "--batch", "2", "--json", path]),
        ("--plot", ["profile", model, *work, "--batch", "2", "--plot", path]),
        ("--snapshot", ["profile", model, *work, "--batch", "2", "--snapshot", path]),
        ("--json", ["estimate", model, "--input", "3x8x8", "--batch", "2", "--json", path]),
        ("--html", ["report", str(good_result), "--html", path]),
        ("--plot", ["report", str(good_result), "--plot", path]),
        ("--json", ["scale-out", str(good_result), "--json", path]),
    ]  # fmt: skip
    for option, args in commands:
        code, out, err = _invoke(*args)
        _one_line_exit_2(code, out, err, f"{option} {path}: ")
        assert needle in err
        assert out == ""  # report: not even the table before the refusal
    assert not marker.exists()  # no model was imported: no work started


def test_a_writable_output_passes(tmp_path: Path) -> None:
    _check_output(str(tmp_path / "new" / "deeper" / "r.json"), "--json", makes_folders=True)
    _check_output(str(tmp_path / "p.png"), "--plot")
    _check_output("", "--json")
    _check_output("-", "--json")
    with pytest.raises(SpecError, match="no such directory"):
        _check_output(str(tmp_path / "new" / "p.png"), "--plot")  # savefig makes no folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only directory")
def test_a_read_only_directory_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(SpecError, match="cannot write in"):
            _check_output(str(locked / "r.json"), "--json", makes_folders=True)
    finally:
        locked.chmod(0o700)


# -- budgets and input sizes ------------------------------------------------------------------
@linux
@pytest.mark.parametrize(
    ("limit", "needle"),
    [
        ("1MiB", "the smallest CPU budget is 16.0 MiB"),
        ("99999999TiB", "8 EiB (2**63 bytes) or more"),
        ("64TiB", "more than a CPU probe here can use: at most"),
    ],
)
def test_a_cpu_budget_out_of_range_is_bad_input(
    marker_model: tuple[str, Path], limit: str, needle: str
) -> None:
    model, marker = marker_model
    code, out, err = _invoke("probe", model, "--input", "3x8x8", "--device", "cpu",
                             "--memory-limit", limit, "--json", "")  # fmt: skip
    _one_line_exit_2(code, out, err, needle)
    assert not marker.exists()


def test_an_absurd_input_is_bad_input(marker_model: tuple[str, Path]) -> None:
    model, marker = marker_model
    huge = "99999999999x99999999999"
    code, out, err = _invoke("probe", model, "--input", huge, "--device", "cpu",
                             "--memory-limit", "256MiB", "--json", "")  # fmt: skip
    _one_line_exit_2(code, out, err, "one sample would be 4e+22 bytes")
    assert not marker.exists()


def test_the_api_refuses_the_same_before_any_trial() -> None:
    for bad in ("1MiB", float("nan"), float("inf"), True, 0, "64TiB"):
        with pytest.raises(SpecError):
            find_batch_size("nowhere:Net", input_shape=(4,), device="cpu", memory_limit=bad)
    with pytest.raises(SpecError, match="more than any tensor can hold"):
        find_batch_size("nowhere:Net", input_shape=(10**12, 10**12), device="cpu")
    with pytest.raises(SpecError, match="more than any tensor can hold"):
        parse_input_spec("x=99999999999x99999999999:int64:10")
    with pytest.raises(ValueError, match="8 EiB"):
        parse_bytes("8388608TiB")  # 2**63 bytes
    assert parse_bytes("8388607TiB") == 8388607 * 2**40
    assert InputSpec((3, 8, 8), "bfloat16").sample_bytes == 384


# -- --json - is JSON alone -------------------------------------------------------------------
@linux
def test_json_to_stdout_is_only_json_in_a_real_process(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
    done = subprocess.run(
        [sys.executable, "-m", "bsfinder", "probe", "bsfinder.examples:SmallCNN",
         "--input", "3x8x8", "--max-batch", "2", "--memory-limit", "256MiB",
         "--device", "cpu", "--steps", "1", "--json", "-"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)  # the whole of stdout
    assert data["recommendations"]["max_batch"] == 2
    assert "largest that fits" in done.stderr  # the summary went to stderr
    assert not (tmp_path / "bsfinder-result.json").exists()


@linux
def test_json_to_stdout_keeps_a_models_print_off_it(tmp_path: Path) -> None:
    # GIVEN a model that prints when built, probed in this process (inline)
    model = tmp_path / "chatty.py"
    model.write_text(
        "import torch\n"
        "def make():\n"
        "    print('building the model')\n"
        "    return torch.nn.Linear(4, 2)\n"
    )
    code, out, err = _invoke("probe", f"{model}:make", "--input", "4", "--device", "cpu",
                             "--isolation", "inline", "--max-batch", "2", "--steps", "1",
                             "--memory-limit", "256MiB", "--json", "-")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["recommendations"]["max_batch"] == 2
    assert "building the model" in err and "largest that fits" in err


# -- oneDNN's message is out of memory only under a budget ------------------------------------
class _PrimitiveFails(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "could not create a primitive descriptor for a convolution forward propagation "
            "primitive"
        )


@linux
@pytest.mark.parametrize("enforced", [False, True])
def test_onednn_failure_is_oom_only_under_an_enforced_budget(enforced: bool) -> None:
    workload = Workload(WorkloadSpec(inputs=(InputSpec((4,)),)), "cpu", factory=_PrimitiveFails)
    workload.load()
    backend = CpuBackend(in_process=True)
    backend.apply_budget(4 * 2**30, enforce=enforced)
    try:
        assert backend.under_limit is enforced
        workload.build()
        if enforced:
            trial = execute_trial(workload, backend, 2, warmup_steps=0, steps=1)
            assert not trial.fits and trial.error.startswith("onednn: could not create")
        else:
            with pytest.raises(UserCodeError, match="could not create a primitive descriptor"):
                execute_trial(workload, backend, 2, warmup_steps=0, steps=1)
    finally:
        backend.release_budget()
    assert not backend.under_limit
