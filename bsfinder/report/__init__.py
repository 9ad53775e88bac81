"""Renderers: results in, strings out (the CLI prints them)."""

from bsfinder.report.table import render_summary, render_trial_line, render_trials

__all__ = ["render_summary", "render_trial_line", "render_trials"]
