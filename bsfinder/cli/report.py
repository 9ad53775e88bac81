"""``bsfinder report``: HTML and plot from a saved result."""

from __future__ import annotations

import click

from bsfinder.cli._output import (
    _echo,
    _load_result,
    _plot,
    _require_writable,
    errors_to_exit_codes,
)
from bsfinder.errors import SpecError


@click.command()
@click.argument("result_path", metavar="RESULT.json", type=click.Path(dir_okay=False))
@click.option("--html", "html_path", default="", metavar="PATH", help="Write an HTML report.")
@click.option(
    "--plot",
    "plot_path",
    default="",
    metavar="PNG",
    help="Draw throughput and memory here (and the LR range test's curve, with --data).",
)
@errors_to_exit_codes
def report(result_path: str, html_path: str, plot_path: str) -> None:
    """Show a saved probe result; --html writes a page, --plot a picture (matplotlib)."""
    from bsfinder.core.results import write_text_atomic
    from bsfinder.report import render_summary, render_trials

    _require_writable(("--html", html_path, True), ("--plot", plot_path, False))
    result = _load_result(result_path)
    _echo(render_trials(result))
    click.echo()
    _echo(render_summary(result))
    if html_path:
        from bsfinder.report.html import render_html

        try:
            write_text_atomic(html_path, render_html(result))  # atomic text write
        except OSError as exc:
            raise SpecError(f"--html {html_path}: {exc.strerror or exc}") from None
        click.echo(f"wrote {html_path}")
    if plot_path:
        _plot(result, plot_path)
