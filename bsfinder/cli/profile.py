"""``bsfinder profile``: where one training step's memory goes."""

from __future__ import annotations

import json
from typing import Any

import click

from bsfinder.cli._options import _workload_options
from bsfinder.cli._output import _fail, _require_writable
from bsfinder.cli._signals import _hold_signals, _signal_exit
from bsfinder.errors import BsfinderError


@click.command()
@click.argument("model")
@_workload_options
@click.option("--batch", "batch_size", type=click.IntRange(min=1), required=True,
              help="The batch to profile.")  # fmt: skip
@click.option(
    "--memory-limit",
    default=None,
    metavar="BYTES",
    help="Budget to run under, e.g. 4GiB (CPU default: 90% of the available RAM, or of the "
    "container's memory limit minus its use if less).",
)
@click.option(
    "--target-memory",
    "target_memory",
    multiple=True,
    metavar="BYTES",
    help="Predict the largest batch for this much memory too, e.g. 24GiB (repeatable).",
)
@click.option(
    "--snapshot",
    default=None,
    metavar="PICKLE",
    help="CUDA: write torch's memory snapshot of the step (open at pytorch.org/memory_viz).",
)
@click.option(
    "--no-scaling",
    is_flag=True,
    help="Profile only --batch, not also half of it (no per-sample cost, no prediction).",
)
@click.option("--json", "json_path", default="", metavar="PATH", help="Also write JSON here.")
@click.option(
    "--plot",
    "plot_path",
    default="",
    metavar="PNG",
    help="Draw the step's timeline here (needs matplotlib: bsfinder[plot]).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def profile(
    model: str,
    workload: dict[str, Any],
    batch_size: int,
    memory_limit: str | None,
    target_memory: tuple[str, ...],
    snapshot: str | None,
    no_scaling: bool,
    json_path: str,
    plot_path: str,
    debug: bool,
) -> None:
    """Where the memory of one training step goes: weights, gradients, optimizer, activations.

    The categories sum to the measured peak; per-module activation memory follows. A second
    step at half the batch splits the peak into fixed and per-sample memory and predicts the
    largest batch for this device and each --target-memory.
    """
    from bsfinder.api import profile_memory
    from bsfinder.core.results import write_json_atomic
    from bsfinder.report import render_profile

    _require_writable(
        debug,
        ("--json", json_path, True),
        ("--plot", plot_path, False),
        ("--snapshot", snapshot or "", False),
    )
    try:
        result = profile_memory(
            model,
            batch_size=batch_size,
            memory_limit=memory_limit,
            scaling=not no_scaling,
            target_memory=target_memory,
            snapshot=snapshot,
            **workload,
        )
    except BsfinderError as exc:
        _fail(exc, debug)
    _hold_signals()  # measured: a signal now waits until it is shown and written
    click.echo(render_profile(result))
    if snapshot:
        click.echo(f"wrote {snapshot} (open it at https://pytorch.org/memory_viz)")
    if json_path:
        write_json_atomic(json_path, json.dumps(result.to_dict(), indent=2))
        click.echo(f"wrote {json_path}")
    if plot_path:
        from bsfinder.report.plot import plot_timeline

        try:
            plot_timeline(result, plot_path)
        except BsfinderError as exc:
            _fail(exc, debug)
        click.echo(f"wrote {plot_path}")
    _signal_exit()
