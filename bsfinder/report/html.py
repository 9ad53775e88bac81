"""A self-contained HTML report of a probe: the picture (embedded PNG), the
recommendations and the trial table."""

from __future__ import annotations

import base64
import html
import io

from bsfinder.core.results import ProbeResult
from bsfinder.errors import SpecError
from bsfinder.report.table import render_summary, render_trials

__all__ = ["render_html"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; }
.note { color: #666; }
"""


def render_html(result: ProbeResult) -> str:
    """One HTML page, no external files; the picture needs matplotlib (else a note)."""
    from bsfinder.report.plot import plot_probe

    model = result.workload.get("model_label") or result.workload.get("model") or "model"
    try:
        buffer = io.BytesIO()
        plot_probe(result, buffer)
        picture = (
            '<img alt="throughput and peak memory by batch size" '
            f'src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'
        )
    except SpecError as exc:
        picture = f'<p class="note">No picture: {html.escape(str(exc))}</p>'
    env = result.environment
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if v)
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
            "<h2>Trials</h2>",
            f"<pre>{html.escape(render_trials(result))}</pre>",
            "</body></html>",
        ]
    )
