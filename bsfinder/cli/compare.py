"""``bsfinder compare``: a CI gate on two results."""

from __future__ import annotations

import json
import sys

import click

from bsfinder.cli._output import _echo, _load_result, errors_to_exit_codes


@click.command()
@click.argument("base", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@click.option(
    "--fail-on",
    "fail_on",
    multiple=True,
    metavar="METRIC:±N%",
    help="Exit 1 when METRIC moves this much: max-batch:-5%, peak-per-sample:+10%, "
    "samples-per-s:-10%, time-optimal:-20% (repeatable).",
)
@click.option(
    "--format",
    "output_format",
    default="text",
    show_default=True,
    type=click.Choice(["text", "markdown", "json"]),
    help="markdown: for a CI job summary.",
)
@errors_to_exit_codes
def compare(base: str, new: str, fail_on: tuple[str, ...], output_format: str) -> None:
    """Compare two probe results (BASE, NEW): deltas, and exit 1 on a regression.

    For CI: keep the main branch's result as BASE, probe the change, and gate on
    --fail-on thresholds. Warns when the device or software differ.
    """
    from bsfinder.core.compare import compare as compare_results
    from bsfinder.core.compare import parse_threshold
    from bsfinder.report.compare import render_comparison

    thresholds = tuple(parse_threshold(t) for t in fail_on)
    results = [_load_result(base), _load_result(new)]
    comparison = compare_results(results[0], results[1], thresholds)
    if output_format == "json":
        click.echo(json.dumps(comparison.to_dict(), indent=2))
    else:
        _echo(render_comparison(comparison, markdown=output_format == "markdown"))
    if not comparison.ok:
        sys.exit(1)
