"""``bsfinder profile``: where one training step's memory goes."""

from __future__ import annotations

import json
from typing import Any

import click

from bsfinder.cli._options import _MEMORY_LIMIT_OPTION, _workload_options
from bsfinder.cli._output import _require_writable, errors_to_exit_codes
from bsfinder.cli._signals import _hold_signals, _signal_exit


@click.command()
@click.argument("model")
@_workload_options
@click.option("--batch", "batch_size", type=click.IntRange(min=1), required=True,
              help="The batch to profile.")  # fmt: skip
@_MEMORY_LIMIT_OPTION
@click.option(
    "--target-memory",
    "target_memory",
    multiple=True,
    metavar="BYTES",
    help="Predict the largest batch for a card of this memory too (not a budget here), "
    "e.g. 24GiB (repeatable).",
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
@errors_to_exit_codes
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
) -> None:
    """Where the memory of one training step goes: weights, gradients, optimizer, activations.

    The categories sum to the measured peak; per-module activation memory follows. A second
    step at half the batch splits the peak into fixed and per-sample memory and predicts the
    largest batch for this device and each --target-memory.
    """
    from bsfinder.api import profile_memory
    from bsfinder.core.results import write_text_atomic
    from bsfinder.report import render_profile

    _require_writable(
        ("--json", json_path, True),
        ("--plot", plot_path, False),
        ("--snapshot", snapshot or "", False),
    )
    result = profile_memory(
        model,
        batch_size=batch_size,
        memory_limit=memory_limit,
        scaling=not no_scaling,
        target_memory=target_memory,
        snapshot=snapshot,
        **workload,
    )
    _hold_signals()  # measured: a signal now waits until it is shown and written
    click.echo(render_profile(result))
    if snapshot:
        click.echo(f"wrote {snapshot} (open it at https://pytorch.org/memory_viz)")
    if json_path:
        write_text_atomic(json_path, json.dumps(result.to_dict(), indent=2))
        click.echo(f"wrote {json_path}")
    if plot_path:
        from bsfinder.report.plot import plot_timeline

        plot_timeline(result, plot_path)
        click.echo(f"wrote {plot_path}")
    _signal_exit()
