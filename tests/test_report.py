"""Renderers return strings; the tests pin the text."""

from __future__ import annotations

from bsfinder import FakeRunner, ProbeSettings, run_probe
from bsfinder.report import render_summary, render_trials


def saturating(b: int) -> float:
    return 0.020 + b / 64 * 0.001 + max(0, b - 64) * 0.0003


def _result(**settings):
    dev = FakeRunner(capacity_bytes=2**20, fixed_bytes=2**16, per_sample_bytes=1000,
                     step_time=saturating)  # fmt: skip
    return run_probe(dev, ProbeSettings(**settings))


def test_summary_text() -> None:
    lines = render_summary(_result(base_lr=3e-4, base_batch=32)).splitlines()
    assert lines[:6] == [
        # (2**20 - 2**16) / 1000 = 983 samples -> 976 on the grid of 8; peak 1041536 B
        "largest that fits     : 976   (next tried: 984 ✗; peak 1017 KiB of capacity 1.00 MiB "
        "on fake (fake))",
        # the jump from 256 to 976 passed over 512
        "largest power of two  : 512   (below the largest that fits; not run on its own)",
        # the line's first prediction was the edge: its safe batch is not run on its own
        "safe (5% headroom)    : 928   (peak 970 KiB on the memory line, 95% of capacity; not "
        "run on its own)",
        # 64 is the smallest batch within 5% of the fitted best; batch 32 was not tried, so
        # the comparison is with the largest, 976, whose fit-only trial timed its last step
        "time-optimal          : 64   (>= 95% of the best fitted throughput, 3.05k samples/s; "
        "the largest, 976, gives 1.04x its samples/s)",
        # 3e-4 * sqrt(64 / 32)
        "learning rate         : 0.000424 at batch 64 (sqrt rule, from 0.0003 @ 32), warm up "
        "over ~5 epochs",
        # AdamW's weight decay x (64 / 32) * (3e-4 / 4.24e-4) = 1.41
        "                        AdamW: weight decay x 1.41 keeps its timescale B / (lr x wd x "
        "N) in epochs (Wang & Aitchison 2024), from 0.0003 @ 32 to 0.000424 @ 64",
    ]
    assert lines[6].startswith("trials                : 7 in ")  # 1..256 by 4x, jump, confirm


def test_summary_without_a_base_batch_compares_with_the_largest() -> None:
    lines = render_summary(_result()).splitlines()
    # 976's fit-only trial timed its second step: 3160/s against 64 at 3048/s
    assert lines[3].endswith("the largest, 976, gives 1.04x its samples/s)")


def test_trial_table_text() -> None:
    table = render_trials(_result(granularity="pow2")).splitlines()
    assert table[0].split() == ["#", "batch", "phase", "fits", "step", "samples/s", "peak",
                                "of", "capacity"]  # fmt: skip
    assert table[2].split() == ["1", "1", "grow", "✓", "20", "ms", "50", "65.0", "KiB", "6%"]
    assert table[-1].split() == ["11", "1024", "grow", "✗", "oom", "-", "-", "-", "-"]


def test_report_writes_an_html_page_and_a_picture(cli, tmp_path) -> None:
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "compare-base.json"
    page, png = tmp_path / "report.html", tmp_path / "probe.png"
    proc = cli("report", str(fixture), "--html", str(page), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "largest that fits     : 584" in proc.stdout and "\x1b[" not in proc.stdout
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "data:image/png;base64," in text
    assert "Recommendations" in text and "time-optimal" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    bad = cli("report", str(tmp_path / "none.json"))
    assert bad.returncode == 2 and "no such file" in bad.stderr


def test_colour_on_a_terminal_unless_no_color(monkeypatch, capsys) -> None:
    import sys

    from bsfinder.cli import _output as cli

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    cli._echo("batch 8 ✓, batch 16 ✗")
    coloured = capsys.readouterr().out
    assert "\x1b[32m✓" in coloured and "\x1b[31m✗" in coloured
    monkeypatch.setenv("NO_COLOR", "1")
    cli._echo("batch 8 ✓, batch 16 ✗")
    assert capsys.readouterr().out == "batch 8 ✓, batch 16 ✗\n"
    assert cli._bar(2, 4, width=8) == "[####....]"


def test_a_time_optimal_batch_between_trials_gives_the_fits_samples_per_s() -> None:
    from bsfinder.noise.scale import NoiseScale
    from bsfinder.probe import with_noise_scale

    # GIVEN the probe's trials 4x apart (1, 4, 16, 64, 256, then the edge) and a noise scale
    # whose time-to-target optimum, 128, lies between two of them
    found = _result()
    noise = NoiseScale(4096.0, 4096.0, 4096.0, 1.0, 4096.0, 64, 4, 8)
    with_noise = with_noise_scale(found, noise, ProbeSettings())
    assert with_noise.recommendations.time_optimal_batch == 128
    assert 128 not in {t.batch_size for t in found.trials}
    # THEN the summary gives the throughput fit's samples/s there, and says it was not run
    line = next(x for x in render_summary(with_noise).splitlines() if x.startswith("time-opt"))
    assert "samples/s on the throughput fit (not run: between the trials))" in line, line
