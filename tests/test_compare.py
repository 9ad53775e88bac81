"""The CI gate: 'bsfinder compare' on committed fixture results.

The fixtures (tests/fixtures/compare-*.json) are FakeRunner probes with a 64 MiB budget:
``base`` and ``same`` at 100 kB per sample, ``regressed`` at 125 kB per sample and 15% slower
steps, ``other-device`` as base on another CPU and torch version.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bsfinder import SpecError
from bsfinder.core.compare import Threshold, compare, parse_threshold
from bsfinder.core.results import ProbeResult

FIXTURES = Path(__file__).parent / "fixtures"


def _fixture(name: str) -> str:
    return str(FIXTURES / f"compare-{name}.json")


GATE = ("--fail-on", "max-batch:-5%", "--fail-on", "samples-per-s:-10%",
        "--fail-on", "peak-per-sample:+10%")  # fmt: skip


def test_no_regression_exits_0(cli) -> None:
    proc = cli("compare", _fixture("base"), _fixture("same"), *GATE)
    assert proc.returncode == 0, proc.stderr
    assert "no regression" in proc.stdout and "warning" not in proc.stdout


def test_a_regression_exits_1_and_names_the_metric(cli) -> None:
    proc = cli("compare", _fixture("base"), _fixture("regressed"), *GATE)
    assert proc.returncode == 1
    assert "regression: max-batch, peak-per-sample, samples-per-s" in proc.stdout
    assert "REGRESSION (max-batch:-5%)" in proc.stdout and "-20.5%" in proc.stdout
    # AND a looser gate lets the same change through
    loose = cli("compare", _fixture("base"), _fixture("regressed"), "--fail-on", "max-batch:-25%")
    assert loose.returncode == 0 and "no regression" in loose.stdout


def test_mismatched_devices_warn_in_markdown_and_json(cli) -> None:
    proc = cli("compare", _fixture("base"), _fixture("other-device"), "--format", "markdown")
    assert proc.returncode == 0
    assert proc.stdout.startswith("### bsfinder compare: no regression")
    assert "| max-batch | 584 | 584 | +0.0% |" in proc.stdout
    assert "> **warning**: device name differs: x86_64 vs aarch64" in proc.stdout
    assert "torch differs" in proc.stdout
    data = json.loads(cli("compare", _fixture("base"), _fixture("other-device"),
                          "--format", "json").stdout)  # fmt: skip
    assert data["ok"] and any("device name" in w for w in data["warnings"])


def test_bad_input_is_one_line_exit_2(cli, tmp_path) -> None:
    bad = cli("compare", _fixture("base"), _fixture("same"), "--fail-on", "speed:-5%")
    assert bad.returncode == 2 and "METRIC:+N%" in bad.stderr and "Traceback" not in bad.stderr
    missing = cli("compare", _fixture("base"), str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    estimate = tmp_path / "estimate.json"
    estimate.write_text(json.dumps({"kind": "estimate", "schema_version": 1}))
    wrong = cli("compare", _fixture("base"), str(estimate))
    assert wrong.returncode == 2 and "not a bsfinder probe result" in wrong.stderr


def test_thresholds_and_deltas() -> None:
    assert parse_threshold("max-batch:-5%") == Threshold("max-batch", -5.0)
    assert parse_threshold(" peak-per-sample:+10% ").percent == 10.0
    for text in ("max-batch:5", "max-batch:0%", "nope:-5%"):
        with pytest.raises(SpecError):
            parse_threshold(text)
    drop = Threshold("max-batch", -5.0)
    assert drop.breached(-0.05) and drop.breached(-0.2) and not drop.breached(-0.049)
    assert not drop.breached(None)
    base = ProbeResult.load(_fixture("base"))
    regressed = ProbeResult.load(_fixture("regressed"))
    found = compare(base, regressed, (drop,))
    by_metric = {d.metric: d for d in found.deltas}
    assert by_metric["max-batch"].change == pytest.approx(464 / 584 - 1)
    # peak per sample is the slope over fitting trials: the fixtures' 100 kB and 125 kB
    assert by_metric["peak-per-sample"].base == pytest.approx(100_000)
    assert by_metric["peak-per-sample"].new == pytest.approx(125_000)
    assert by_metric["samples-per-s"].detail == "at batch 256"
    assert [d.metric for d in found.regressions] == ["max-batch"] and not found.ok
