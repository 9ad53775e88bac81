"""Rendering of a comparison: a plain table for terminals, Markdown for CI job summaries."""

from __future__ import annotations

from bsfinder.core.compare import METRICS, Comparison, MetricDelta
from bsfinder.units import format_bytes, format_rate

__all__ = ["render_comparison"]


def _value(delta: MetricDelta, value: float | None) -> str:
    if value is None:
        return "-"
    if delta.metric == "peak-per-sample":
        return f"{format_bytes(int(value))}/sample"
    if delta.metric == "samples-per-s":
        return format_rate(value)
    return f"{value:g}"


def _change(delta: MetricDelta) -> str:
    return "-" if delta.change is None else f"{delta.change:+.1%}"


def _verdict(delta: MetricDelta) -> str:
    if delta.failed:
        return "REGRESSION (" + ", ".join(delta.failed) + ")"
    if delta.within_noise:
        noise = f"; noise {delta.noise:.0%}" if delta.noise is not None else ""
        return f"within noise ({', '.join(delta.within_noise)}{noise})"
    return "ok"


def render_comparison(comparison: Comparison, *, markdown: bool = False) -> str:
    """The deltas, one row per metric, the verdict, and the warnings."""
    header = ["metric", "base", "new", "change", "", "verdict"]
    rows = [
        [
            d.metric,
            _value(d, d.base),
            _value(d, d.new),
            _change(d),
            d.detail,
            _verdict(d),
        ]
        for d in comparison.deltas
    ]
    verdict = (
        "no regression"
        if comparison.ok
        else "regression: " + ", ".join(d.metric for d in comparison.regressions)
    )
    if markdown:
        lines = [
            "### bsfinder compare: " + verdict,
            "",
            "| " + " | ".join(h or "compared" for h in header) + " |",
            "|" + "---|" * len(header),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        if comparison.warnings:
            lines += ["", *(f"> **warning**: {w}" for w in comparison.warnings)]
        return "\n".join(lines)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines += ["", verdict]
    lines += [f"warning: {w}" for w in comparison.warnings]
    if not comparison.thresholds:
        lines.append(
            "(no --fail-on thresholds: nothing can fail; e.g. --fail-on max-batch:-5% "
            f"--fail-on samples-per-s:-10%; metrics: {', '.join(METRICS)})"
        )
    return "\n".join(lines)
