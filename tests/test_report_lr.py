"""The LR range test in the reports: its curve and suggestion in ``report --html`` (an
inline SVG and a table) and in ``--plot`` (a third panel), from one real probe on the
bundled digits with ``data=``; results without a range test render as before."""

from __future__ import annotations

import math
import re
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bsfinder.core.results import ProbeResult
from bsfinder.errors import SpecError
from bsfinder.report.html import render_html
from bsfinder.report.plot import lr_view, plot_lr_range, plot_probe

pytest.importorskip("sklearn")  # the digits ship with scikit-learn
pytest.importorskip("matplotlib")

from examples.digits import DigitsNet, make_loader

FIXTURES = Path(__file__).parent / "fixtures"
# the SVG's plot area (bsfinder/report/html.py: _W, _LEFT, _RIGHT)
LEFT, PLOT_W = 62, 720 - 62 - 16


@pytest.fixture(scope="module")
def probed() -> ProbeResult:
    """One real probe with data and a reference LR: trials, noise scale and range test."""
    from bsfinder import find_batch_size

    result = find_batch_size(
        DigitsNet, inputs=["1x8x8", ":int64:10"], memory_limit="512MiB", max_batch=256,
        optimizer="sgd", data=make_loader, base_lr=0.03, base_batch=32, isolation="inline",
        granularity="pow2",
    )  # fmt: skip
    assert result.recommendations.lr_range is not None, result.notes
    return result


def _record(result: ProbeResult) -> dict[str, Any]:
    record = result.recommendations.lr_range
    assert record is not None
    return record


def _with_record(result: ProbeResult, record: dict[str, Any] | None) -> ProbeResult:
    return replace(result, recommendations=replace(result.recommendations, lr_range=record))


def _svg(page: str) -> str:
    found = re.search(r"<svg.*?</svg>", page, re.S)
    assert found is not None, "no SVG in the page"
    return found.group(0)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR comes first
    return width, height


def test_html_draws_the_curve_and_marks_the_suggestion(probed: ProbeResult) -> None:
    record = _record(probed)
    curve, suggestion = record["curve"], record["suggestion"]
    lr, rule = suggestion["lr"], suggestion["rule"]
    assert lr is not None and record["recommended"] == "range-test"
    page = render_html(probed)
    svg = _svg(page)
    # the raw and the smoothed loss: one polyline each (no gaps), a point per finite step
    lines = re.findall(r'<polyline fill="none" ([^>]*) points="([^"]*)"', svg)
    assert len(lines) == 2
    for (_, points), key in zip(lines, ("losses", "smoothed"), strict=True):
        finite = [v for v in curve[key] if v is not None and math.isfinite(v)]
        assert len(points.split()) == len(finite)
    # the marker sits at the suggested LR on the log axis
    circle = re.search(r'<circle class="suggestion" cx="([\d.]+)"', svg)
    assert circle is not None
    lrs = curve["lrs"]
    where = math.log10(lr / lrs[0]) / math.log10(lrs[-1] / lrs[0])
    assert float(circle.group(1)) == pytest.approx(LEFT + where * PLOT_W, abs=0.1)
    assert f"suggested {lr:.3g} ({rule})" in svg
    for other, value in suggestion["by_rule"].items():
        if other != rule and value is not None:
            assert f"{other} rule: {value:.3g}" in svg  # its light line's legend
    assert "learning rate (log scale)" in svg and "nan" not in svg.lower()


def test_html_table_has_the_rule_the_sweep_and_the_reference(probed: ProbeResult) -> None:
    record = _record(probed)
    suggestion, reference = record["suggestion"], record["reference"]
    page = render_html(probed)
    table = page[page.index('<table class="lr">') : page.index("</table>")]
    batch = record["batch_size"]
    assert f"{suggestion['lr']:.3g} at batch {batch} (sgd, {suggestion['rule']} rule)" in table
    assert suggestion["reason"] in table.replace("&#x27;", "'")
    steps = len(record["curve"]["lrs"])
    assert re.search(
        rf"{steps} steps, lr 1e-07 to [\d.e+-]+; .*, [\d.]+ m?s in this process",
        table,  # inline (the fixture)
    )
    # the scaled reference, with its source, and which LR is recommended and why
    assert f"{reference['lr']:.3g} at batch {batch} ({reference['rule']} rule, from 0.03 at " \
        "batch 32)" in table  # fmt: skip
    assert f"the range test&#x27;s {suggestion['lr']:.3g}: measured at this batch" in table


def test_plot_adds_the_lr_panel_and_draws_it_alone(probed: ProbeResult, tmp_path) -> None:
    with_panel, without, alone = tmp_path / "p.png", tmp_path / "q.png", tmp_path / "lr.png"
    plot_probe(probed, with_panel)
    plot_probe(probed, without, lr_curve=False)
    plot_lr_range(probed, alone)
    # figure inches x 110 dpi: 9 x 10.5 with the LR panel, 9 x 7 without, 9 x 4.5 alone
    assert _png_size(with_panel.read_bytes()) == (990, 1155)
    assert _png_size(without.read_bytes()) == (990, 770)
    assert _png_size(alone.read_bytes()) == (990, 495)


def test_report_cli_writes_the_curve_from_the_saved_json(
    probed: ProbeResult, cli, tmp_path
) -> None:
    saved, page, png = tmp_path / "r.json", tmp_path / "r.html", tmp_path / "r.png"
    probed.save(saved)
    proc = cli("report", str(saved), "--html", str(page), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    text = page.read_text()
    lr = _record(probed)["suggestion"]["lr"]
    assert "Learning rate: the LR range test" in text and f"suggested {lr:.3g}" in text
    assert _png_size(png.read_bytes())[1] == 1155


def test_a_result_from_before_the_range_test_renders_as_before(
    probed: ProbeResult, tmp_path
) -> None:
    old = ProbeResult.load(FIXTURES / "compare-base.json")
    assert old.recommendations.lr_range is None and lr_view(old) is None
    # and the same probe as it was before the range test: no lr_range, no LR advice
    before = replace(
        probed, recommendations=replace(probed.recommendations, lr_range=None, learning_rate=None)
    )
    for result in (old, before):
        page = render_html(result)
        assert "<svg" not in page and "LR range test" not in page
        assert "data:image/png;base64," in page and "Recommendations" in page
        plot_probe(result, tmp_path / "old.png")
        assert _png_size((tmp_path / "old.png").read_bytes())[1] == 770
    with pytest.raises(SpecError, match="no LR range test to plot: probe with --data"):
        plot_lr_range(old, tmp_path / "none.png")


def test_a_curve_without_a_clear_descent_says_why(probed: ProbeResult, tmp_path) -> None:
    from bsfinder.lr import find_lr

    # 20 steps between 1e-7 and 1e-6: SGD does not move the loss; no LR is read
    found = find_lr(DigitsNet, make_loader, batch_size=32, optimizer="sgd", start_lr=1e-7,
                    end_lr=1e-6, steps=20, isolation="inline")  # fmt: skip
    assert found.lr is None
    result = _with_record(probed, found.to_dict())  # no reference, recommended or why
    page = render_html(result)
    svg = _svg(page)
    assert 'class="suggestion"' not in svg and "no suggestion: no clear descent" in svg
    assert "<th>why none</th>" in page and "none at batch 32 (sgd)" in page
    plot_probe(result, tmp_path / "flat.png")
    assert _png_size((tmp_path / "flat.png").read_bytes())[1] == 1155


def test_a_non_finite_loss_is_a_gap_in_the_line(probed: ProbeResult) -> None:
    record = _record(probed)
    curve = dict(record["curve"])
    # a step whose loss was inf or nan is null in the JSON (LRCurve.to_dict)
    middle = len(curve["lrs"]) // 2
    curve["losses"] = [None if i == middle else v for i, v in enumerate(curve["losses"])]
    svg = _svg(render_html(_with_record(probed, {**record, "curve": curve})))
    raw = re.findall(r'<polyline fill="none" stroke="#1f77b4" stroke-opacity="0.3" points', svg)
    assert len(raw) == 2 and "nan" not in svg.lower()
