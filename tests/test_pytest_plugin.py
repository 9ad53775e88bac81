"""The pytest plugin, as a user's test suite meets it: generated test files run by ``pytester``.

Real probes in fresh processes under a 128 MiB budget, on a small MLP whose 3x32x32 input
(12 KiB a sample) puts the largest batch near 9,000 at hidden width 64 and near 3,000 at
1024 (measured). Coarse granularities keep each probe to a few trials. Runs that test what
a fresh pytest process does (the plugin loaded from the command line, torch not imported at
start-up) use ``runpytest_subprocess``; the others run in this process (``runpytest``),
their trials still in fresh processes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch  # noqa: F401  (see below)

from bsfinder.core.results import ProbeResult
from bsfinder.integrations.pytest_plugin import MARKER, UPDATE_OPTION

pytest_plugins = ["pytester"]

# torch is imported here, before any in-process run: pytester restores ``sys.modules`` after
# each ``runpytest``, and torch imported first inside one is dropped and imported again in
# the next, which crashed this process (SIGSEGV); loaded beforehand, it stays loaded.

#: load the plugin from its module, and block the entry point of the same name (once the
#: package is installed with it, both would register the module twice)
PLUGIN = ("-p", "no:bsfinder", "-p", "bsfinder.integrations.pytest_plugin")

MODEL = """
import os

from torch import nn

BUDGET = "128MiB"


class Net(nn.Module):
    def __init__(self, hidden: int = int(os.environ.get("NET_HIDDEN", "64"))) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 32 * 32, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x):
        return self.net(x)
"""


def _no_traceback(output: str) -> None:
    """A failure is the plugin's message, not a traceback through bsfinder's frames."""
    assert "Traceback" not in output
    assert not re.search(r"bsfinder[/\\](api|probe|execution|integrations)", output), output


def test_a_batch_that_fits_passes_and_one_that_does_not_fails_saying_what_fits(
    pytester: pytest.Pytester,
) -> None:
    # GIVEN a user's test file: batch 1024 fits 128 MiB, 16384 does not (12 KiB a sample
    # of input alone is 192 MiB), and a model that raises
    pytester.makepyfile(models=MODEL)
    pytester.makepyfile(
        test_fits="""
        from models import BUDGET, Net


        def test_trains_1024(bsfinder_fits):
            trial = bsfinder_fits(
                Net(), batch=1024, input_shape=(3, 32, 32), memory_limit=BUDGET, device="cpu"
            )
            assert trial.fits and 0 < trial.peak_bytes <= 128 * 2**20


        def test_trains_16384(bsfinder_fits):
            bsfinder_fits(
                Net(), batch=16384, input_shape=(3, 32, 32), memory_limit=BUDGET,
                device="cpu", granularity=4096,
            )


        class Broken(Net):
            def forward(self, x):
                raise ValueError("shapes do not match")


        def test_broken_model(bsfinder_fits):
            bsfinder_fits(Broken(), batch=8, input_shape=(3, 32, 32), memory_limit=BUDGET)
        """
    )
    # WHEN a fresh pytest runs it with the plugin
    result = pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider", timeout=240)
    # THEN the one that fits passes, and the failures say what happened in the budget
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()
    assert "batch 16384 does not fit the 128 MiB budget on cpu" in out
    assert "out of memory (cpu: DefaultCPUAllocator: can't allocate memory" in out
    found = re.search(
        r"The largest batch that fits is (\d+) \(peak [\d.]+ MiB, (\d+)% of the budget\)\.", out
    )
    assert found, out
    largest, percent = int(found[1]), int(found[2])
    assert 0 < largest < 16384 and largest % 4096 == 0 and percent <= 100
    assert (
        "bsfinder could not probe the model: the model raised ValueError at batch 8: shapes "
        "do not match" in out
    )
    assert "pytest -v shows the model's traceback" in out and "--debug" not in out
    assert "During handling" not in out  # the plugin's failure, not bsfinder's error too
    _no_traceback(out)


def test_the_plugin_does_not_import_torch_when_pytest_starts(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import sys


        def test_torch_is_not_loaded():
            assert "torch" not in sys.modules
        """
    )
    result = pytester.runpytest_subprocess(*PLUGIN, timeout=120)
    result.assert_outcomes(passed=1)


def test_its_tests_are_marked_and_a_typo_fails_before_any_process_starts(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_marks="""
        def test_probes(bsfinder_probe):
            bsfinder_probe(None, input_shap=(3, 32, 32), memory_limit="128MiB")


        def test_plain():
            pass
        """
    )
    deselected = pytester.runpytest(*PLUGIN, "--strict-markers", "-m", f"not {MARKER}")
    deselected.assert_outcomes(passed=1, deselected=1)
    typo = pytester.runpytest(*PLUGIN, "--strict-markers", "-m", MARKER)
    typo.assert_outcomes(failed=1, deselected=1)
    out = typo.stdout.str()
    assert "bsfinder_probe: unknown option 'input_shap'; it takes find_batch_size's:" in out
    assert "input_shape" in out
    _no_traceback(out)


def test_the_largest_batch_shrinking_against_its_baseline_fails_naming_both(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(models=MODEL)
    pytester.makepyfile(
        test_baseline="""
        from models import BUDGET, Net


        def test_largest_batch(bsfinder_probe):
            probe = bsfinder_probe(
                Net(), input_shape=(3, 32, 32), memory_limit=BUDGET, device="cpu",
                start_batch=4096, granularity=4096,
            )
            assert probe.max_batch >= 1024
            probe.check_baseline("baselines/net.json")
        """
    )
    baseline = pytester.path / "baselines" / "net.json"
    # GIVEN the baseline recorded with --bsfinder-update-baselines (hidden width 64)
    pytester.runpytest(*PLUGIN, UPDATE_OPTION).assert_outcomes(passed=1)
    base = ProbeResult.load(baseline)
    assert base.max_batch and not base.partial and base.capacity_bytes == 128 * 2**20
    # WHEN the same model is probed again, THEN it passes
    pytester.runpytest(*PLUGIN).assert_outcomes(passed=1)
    # WHEN a change makes the hidden layer 16x wider, THEN the gate fails, naming both
    monkeypatch.setenv("NET_HIDDEN", "1024")
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    found = re.search(
        r"max-batch: (\d+) in the baseline, (\d+) now \(-[\d.]+%; fails max-batch:-5%\)", out
    )
    assert found, out
    assert int(found[1]) == base.max_batch and 1024 <= int(found[2]) < 0.95 * base.max_batch
    assert "regression against the baseline baselines/net.json:" in out  # as run from there
    assert "in the 128 MiB budget on cpu" in out and "REGRESSION (max-batch:-5%)" in out
    assert f"pytest {UPDATE_OPTION}" in out
    _no_traceback(out)
    assert ProbeResult.load(baseline).max_batch == base.max_batch  # a failure rewrites nothing


def test_a_missing_baseline_is_written_and_a_failed_assert_shows_the_probe(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makepyfile(models=MODEL)
    recorded = tmp_path / "net.json"
    pytester.makepyfile(
        test_record=f"""
        from models import BUDGET, Net


        def test_record(bsfinder_probe):
            probe = bsfinder_probe(
                Net(), input_shape=(3, 32, 32), memory_limit=BUDGET, device="cpu",
                start_batch=4096, granularity=4096,
            )
            probe.check_baseline({str(recorded)!r})
        """
    )
    first = pytester.runpytest(*PLUGIN)
    first.assert_outcomes(failed=1)
    out = first.stdout.str()
    assert f"bsfinder baseline {recorded} did not exist: wrote this run's result there" in out
    result = ProbeResult.load(recorded)
    assert result.max_batch and result.recommendations.first_failure
    # the line a plain ``assert probe.max_batch >= N`` prints, from that real probe's result
    # in the Probe the fixture returns (no second probe)
    pytester.makepyfile(
        test_record=f"""
        from pathlib import Path

        from bsfinder.core.results import ProbeResult
        from bsfinder.integrations.pytest_plugin import Probe

        PROBE = Probe(ProbeResult.load({str(recorded)!r}), base_dir=Path.cwd())


        def test_larger():
            assert PROBE.max_batch >= 1_000_000
        """
    )
    failed = pytester.runpytest(*PLUGIN)
    failed.assert_outcomes(failed=1)
    out = failed.stdout.str()
    assert f"assert {result.max_batch} >= 1000000" in out
    assert (
        f"where {result.max_batch} = <bsfinder probe: largest batch that fits "
        f"{result.max_batch} (peak " in out
    )
    assert (
        f", next tried {result.recommendations.first_failure} does not fit, in the 128 MiB "
        "budget on cpu" in out
    )
