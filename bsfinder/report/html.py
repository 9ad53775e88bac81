"""A self-contained HTML report of a probe: the picture (embedded PNG), the
recommendations, the LR range test (an inline SVG chart and its table) and the trial
table."""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from collections.abc import Callable

from bsfinder.core.results import ProbeResult
from bsfinder.errors import SpecError
from bsfinder.report.plot import LRView, lr_title, lr_view
from bsfinder.report.table import render_summary, render_trials
from bsfinder.units import format_duration

__all__ = ["render_html", "render_lr_svg"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.85em; }
img, svg { max-width: 100%; }
.note { color: #666; }
table.lr { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
table.lr th { text-align: left; padding: 0.25em 1em 0.25em 0; vertical-align: top; }
table.lr td { padding: 0.25em 0; }
"""

#: why a sweep ended, in words (``LRCurve.stopped``)
_STOPPED = {
    "diverged": "the smoothed loss diverged",
    "end": "reached the sweep's last learning rate",
    "time-limit": "stopped at the time limit",
    "data": "the data loader ran out",
    "interrupted": "interrupted (Ctrl-C / SIGTERM)",
}

# the chart's frame, in SVG user units (pixels at 100%)
_W, _H = 720, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 62, 16, 30, 46


def render_html(result: ProbeResult) -> str:
    """One HTML page, no external files; the picture needs matplotlib (else a note), the
    LR range test's chart (when the probe ran one) does not."""
    from bsfinder.report.plot import plot_probe

    model = result.workload.get("model_label") or result.workload.get("model") or "model"
    try:
        buffer = io.BytesIO()
        plot_probe(result, buffer, lr_curve=False)  # the LR curve is the SVG below
        picture = (
            '<img alt="throughput and peak memory by batch size" '
            f'src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'
        )
    except SpecError as exc:
        picture = f'<p class="note">No picture: {html.escape(str(exc))}</p>'
    env = result.environment
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if v)
    view = lr_view(result)
    lr_section = (
        []
        if view is None
        else ["<h2>Learning rate: the LR range test</h2>", render_lr_svg(view), _lr_table(view)]
    )
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>bsfinder: {html.escape(str(model))}</title>",
            f"<style>{_STYLE}</style></head><body>",
            f"<h1>bsfinder: {html.escape(str(model))}</h1>",
            f'<p class="note">{html.escape(versions)}</p>',
            picture,
            "<h2>Recommendations</h2>",
            f"<pre>{html.escape(render_summary(result))}</pre>",
            *lr_section,
            "<h2>Trials</h2>",
            f"<pre>{html.escape(render_trials(result))}</pre>",
            "</body></html>",
        ]
    )


def render_lr_svg(view: LRView) -> str:
    """The range test's curve as an inline SVG: loss (each step, faint) and smoothed loss
    against the learning rate on a log axis, the suggestion marked and labelled with its
    rule, the other rules and the scaled reference as light vertical lines."""
    positive = [lr for lr in view.lrs if lr > 0]
    if not positive:
        return '<p class="note">No LR curve: the sweep recorded no positive learning rate.</p>'
    x_low, x_high = math.log10(min(positive)), math.log10(max(positive))
    if x_high - x_low < 1e-9:
        x_low, x_high = x_low - 0.5, x_high + 0.5
    y_low, y_high = view.y_range()
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def px(lr: float) -> float:
        return _LEFT + (math.log10(lr) - x_low) / (x_high - x_low) * plot_w

    def py(loss: float) -> float:
        y = _TOP + (y_high - loss) / (y_high - y_low) * plot_h
        return min(max(y, -10 * _H), 11 * _H)  # far outside is clipped; keep numbers short

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" width="{_W}" '
        f'height="{_H}" role="img" aria-label="loss against learning rate" '
        'font-family="system-ui, sans-serif" font-size="11">',
        f"<title>{html.escape(lr_title(view))}</title>",
        f'<defs><clipPath id="bsf-lr-plot"><rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" '
        f'height="{plot_h}"/></clipPath></defs>',
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#444"/>',
        f'<text x="{_W / 2:.0f}" y="18" text-anchor="middle" font-size="13">'
        f"{html.escape(lr_title(view))}</text>",
    ]
    for k in range(math.ceil(x_low - 1e-9), math.floor(x_high + 1e-9) + 1):
        x = px(10.0**k)
        parts.append(
            f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{_TOP + plot_h}" stroke="#ddd"/>'
            f'<text x="{x:.1f}" y="{_TOP + plot_h + 15}" text-anchor="middle">'
            f"{10.0**k:g}</text>"
        )
    for value in _ticks(y_low, y_high):
        y = py(value)
        parts.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + plot_w}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{value:g}</text>'
        )
    parts.append(
        f'<text x="{_LEFT + plot_w / 2:.0f}" y="{_H - 8}" text-anchor="middle">'
        "learning rate (log scale)</text>"
        f'<text x="14" y="{_TOP + plot_h / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {_TOP + plot_h / 2:.0f})">training loss</text>'
    )
    body = ['<g clip-path="url(#bsf-lr-plot)">']
    for segment in _segments(view.lrs, view.losses):
        body.append(_polyline(segment, px, py, 'stroke="#1f77b4" stroke-opacity="0.3"'))
    for segment in _segments(view.lrs, view.smoothed):
        body.append(_polyline(segment, px, py, 'stroke="#1f77b4" stroke-width="2"'))
    legend: list[tuple[str, str]] = [
        ('stroke="#1f77b4" stroke-opacity="0.3"', "loss (each step)"),
        ('stroke="#1f77b4" stroke-width="2"', "smoothed loss (EMA 0.98)"),
    ]
    dashes = iter(["2 3", "6 2 1 2", "1 4", "8 3"])
    for rule, lr in view.by_rule.items():
        if lr is None or rule == view.rule or not lr > 0:
            continue
        style = f'stroke="#888" stroke-dasharray="{next(dashes, "2 3")}"'
        body.append(_vline(px(lr), style, f"{rule} rule: {lr:.3g}"))
        legend.append((style, f"{rule} rule: {lr:.3g}"))
    if view.reference_lr is not None and view.reference_lr > 0:
        style = 'stroke="#ff7f0e" stroke-dasharray="6 3"'
        name = f"your reference, {view.reference_rule} rule" if view.reference_rule else "reference"
        body.append(_vline(px(view.reference_lr), style, f"{name}: {view.reference_lr:.3g}"))
        legend.append((style, f"{name}: {view.reference_lr:.3g}"))
    if view.lr is not None and view.lr > 0:
        x = px(view.lr)
        label = f"suggested {view.lr:.3g} ({view.rule})"
        body.append(_vline(x, 'stroke="#2ca02c" stroke-width="1.5"', label))
        loss = view.loss_at(view.lr)
        if loss is not None:
            body.append(
                f'<circle class="suggestion" cx="{x:.1f}" cy="{py(loss):.1f}" r="5" '
                f'fill="#2ca02c"><title>{html.escape(label)}: smoothed loss {loss:.4g}'
                "</title></circle>"
            )
        anchor = "end" if (x - _LEFT) / plot_w > 0.3 else "start"
        at = f'x="{x + (-6 if anchor == "end" else 6):.1f}" y="{_TOP + 16}" text-anchor="{anchor}"'
        # a white copy underneath keeps the label legible over the lines it crosses
        body.append(
            f'<text {at} font-weight="bold" font-size="12" fill="white" stroke="white" '
            f'stroke-width="4">{html.escape(label)}</text>'
            f'<text class="suggestion" {at} font-weight="bold" font-size="12" '
            f'fill="#2ca02c">{html.escape(label)}</text>'
        )
        legend.append(
            ('stroke="#2ca02c" stroke-width="1.5"', f"suggested ({view.rule} rule): {view.lr:.3g}")
        )
    else:
        lines = textwrap.wrap(f"no suggestion: {view.reason}", 100)
        body.append(
            f'<text x="{_LEFT + 8}" y="{_TOP + 18}" fill="#d62728">'
            + "".join(
                f'<tspan x="{_LEFT + 8}" dy="{0 if i == 0 else 14}">{html.escape(line)}</tspan>'
                for i, line in enumerate(lines)
            )
            + "</text>"
        )
    body.append("</g>")
    parts.extend(body)
    top = _TOP + plot_h - 10 - 15 * (len(legend) - 1)
    width = 44 + 6.2 * max(len(text) for _, text in legend)
    parts.append(
        f'<rect x="{_LEFT + 4}" y="{top - 13}" width="{width:.0f}" height="{15 * len(legend) + 4}" '
        'fill="white" fill-opacity="0.85" stroke="#ccc"/>'
    )
    for i, (style, text) in enumerate(legend):
        y = top + 15 * i
        parts.append(
            f'<line x1="{_LEFT + 8}" y1="{y - 4}" x2="{_LEFT + 30}" y2="{y - 4}" {style}/>'
            f'<text x="{_LEFT + 36}" y="{y}">{html.escape(text)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _lr_table(view: LRView) -> str:
    """The suggestion, its rule and reason, the other rules, the sweep, and the reference
    and which LR is recommended, as a two-column table."""
    batch = f" at batch {view.batch_size}" if view.batch_size is not None else ""
    if view.lr is not None:
        suggested = f"{view.lr:.3g}{batch} ({view.optimizer}, {view.rule} rule)"
    else:
        suggested = f"none{batch} ({view.optimizer})"
    others = [
        f"{rule} {lr:.3g}" if lr is not None else f"{rule}: none"
        for rule, lr in view.by_rule.items()
        if rule != view.rule
    ]
    span = f"lr {view.lrs[0]:.3g} to {view.lrs[-1]:.3g}"
    stop = _STOPPED.get(view.stopped, view.stopped or "unknown")
    took = "" if view.seconds is None else f", {format_duration(view.seconds)}"
    took += {"process": " in a fresh process", "inline": " in this process"}.get(view.isolation, "")
    rows = [
        ("suggested learning rate", suggested),
        ("how it was read" if view.lr is not None else "why none", view.reason or "-"),
        ("other rules", ", ".join(others) or "none"),
        ("the sweep", f"{len(view.lrs)} steps, {span}; {stop}{took}"),
    ]
    if view.interrupted:
        rows.append(("interrupted", "the curve is what was measured before the stop"))
    if view.reference_lr is not None:
        how = [f"{view.reference_rule} rule"] if view.reference_rule else []
        if view.reference_base is not None:
            how.append(f"from {view.reference_base[0]:g} at batch {view.reference_base[1]}")
        detail = f" ({', '.join(how)})" if how else ""
        rows.append(("your reference, scaled", f"{view.reference_lr:.3g}{batch}{detail}"))
    if view.recommended == "range-test" and view.lr is not None:
        chosen = f"the range test's {view.lr:.3g}"
    elif view.recommended == "reference" and view.reference_lr is not None:
        chosen = f"your reference, scaled: {view.reference_lr:.3g}"
    else:
        chosen = "none"
    if view.recommended is not None or view.why:
        rows.append(("recommended", chosen + (f": {view.why}" if view.why else "")))
    cells = "\n".join(
        f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>"
        for name, value in rows
    )
    return f'<table class="lr">\n{cells}\n</table>'


def _segments(xs: tuple[float, ...], ys: tuple[float, ...]) -> list[list[tuple[float, float]]]:
    """The points with a positive x and a finite y, split where one is missing (a
    non-finite loss is a gap, not a point)."""
    out: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(xs, ys, strict=True):
        if x > 0 and math.isfinite(y):
            out[-1].append((x, y))
        elif out[-1]:
            out.append([])
    return [s for s in out if s]


def _polyline(
    points: list[tuple[float, float]],
    px: Callable[[float], float],
    py: Callable[[float], float],
    style: str,
) -> str:
    coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
    return f'<polyline fill="none" {style} points="{coords}"/>'


def _vline(x: float, style: str, title: str) -> str:
    return (
        f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{_H - _BOTTOM}" {style}>'
        f"<title>{html.escape(title)}</title></line>"
    )


def _ticks(low: float, high: float) -> list[float]:
    """Three to nine round values between ``low`` and ``high`` (1, 2 or 5 x 10^k apart)."""
    span = high - low
    if not span > 0 or not math.isfinite(span):
        return [low]
    raw = span / 8
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    count = math.floor((high - first) / step + 1e-9) + 1
    return [round(first + i * step, 10) for i in range(count)]
