"""Renderers: results in, strings out (the CLI prints them)."""

from bsfinder.report.estimate import render_estimate
from bsfinder.report.profile import render_profile
from bsfinder.report.scaleout import render_scale_out
from bsfinder.report.table import render_summary, render_trial_line, render_trials

__all__ = [
    "render_estimate",
    "render_profile",
    "render_scale_out",
    "render_summary",
    "render_trial_line",
    "render_trials",
]
