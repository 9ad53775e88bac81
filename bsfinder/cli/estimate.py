"""``bsfinder estimate``: peak memory per batch for a device you do not have."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from bsfinder.cli._options import _GRANULARITY_OPTION, _max_batch_option, _workload_options
from bsfinder.cli._output import _require_writable, errors_to_exit_codes
from bsfinder.cli._signals import _hold_signals, _signal_exit
from bsfinder.devices.cards import CARDS
from bsfinder.options import Granularity


@click.command()
@click.argument("model")
@functools.partial(_workload_options, device=False)
@click.option(
    "--target",
    default="cuda",
    show_default=True,
    type=click.Choice(["cuda", "cpu", *CARDS], case_sensitive=False),
    help="The device to plan for (the estimate itself runs here, on CPU): cuda and "
    "--target-memory, or a card preset with the memory a CUDA process really has on it "
    "(bsfinder/devices/cards.py cites the sources).",
)
@click.option(
    "--target-memory",
    default=None,
    metavar="BYTES",
    help="The memory of the card you plan for (not a budget here), e.g. 24GiB or 80GiB: "
    "find the largest batch.",
)
@click.option(
    "--batch",
    "batch_sizes",
    type=click.IntRange(min=1),
    multiple=True,
    help="A batch to estimate (repeat for several).",
)
@click.option(
    "--context", default=None, metavar="BYTES", help="CUDA context size to assume [512MiB]."
)
@click.option(
    "--workspace",
    default=None,
    metavar="BYTES",
    help="cuBLAS workspace to assume [32MiB, Hopper's].",
)
@click.option(
    "--seq-len",
    "sequence_lengths",
    type=click.IntRange(min=1),
    multiple=True,
    help="A language model's frontier: the largest batch at this sequence length (repeat "
    "for several); the first dimension of every integer input is set to it.",
)
@click.option(
    "--what-if",
    is_flag=True,
    help="One table of the planning questions: float32, bf16-mixed and bf16-true weights, "
    "each with and without --checkpointing blocks, on one device and per rank under DDP and "
    "FSDP over --ranks (exact batches unless --granularity is given).",
)
@click.option(
    "--ranks",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="--what-if: the ranks of the DDP and FSDP columns.",
)
@_GRANULARITY_OPTION
@_max_batch_option("Never estimate a larger batch.")
@click.option(
    "--no-scratch",
    is_flag=True,
    help="CPU target: do not measure oneDNN's convolution scratch (no real convolutions run).",
)
@click.option("--json", "json_path", default="", metavar="PATH", help="Also write JSON here.")
@errors_to_exit_codes
def estimate(
    model: str,
    workload: dict[str, Any],
    target: str,
    target_memory: str | None,
    batch_sizes: tuple[int, ...],
    sequence_lengths: tuple[int, ...],
    context: str | None,
    workspace: str | None,
    granularity: Granularity,
    max_batch: int | None,
    no_scratch: bool,
    json_path: str,
    what_if: bool,
    ranks: int,
) -> None:
    """Peak memory of a training step on a device you do not have, and the largest batch.

    Traces one step with fake tensors (no memory is allocated, no GPU is needed) and adds
    what the target holds outside tensors; lists what it cannot see.
    """
    from bsfinder.api import estimate_memory
    from bsfinder.report import render_estimate

    _require_writable(("--json", json_path, True))
    if what_if:
        if sequence_lengths or batch_sizes:
            raise click.UsageError(
                "--what-if searches the largest batch: drop --batch and --seq-len"
            )
        source = click.get_current_context().get_parameter_source("granularity")
        exact = source is click.core.ParameterSource.DEFAULT  # traced steps are cheap
        _what_if(model, workload, target, target_memory, ranks, context=context,
                 workspace=workspace, granularity=1 if exact else granularity,
                 max_batch=max_batch,
                 kernel_scratch=not no_scratch, json_path=json_path)  # fmt: skip
        return
    if sequence_lengths:
        _frontier(model, workload, target, target_memory, batch_sizes, sequence_lengths,
                  context=context, workspace=workspace, granularity=granularity,
                  max_batch=max_batch, json_path=json_path)  # fmt: skip
        return
    result = estimate_memory(
        model,
        **workload,
        batch_sizes=batch_sizes,
        target=target,
        target_memory=target_memory,
        context=context,
        workspace=workspace,
        granularity=granularity,
        max_batch=max_batch,
        kernel_scratch=not no_scratch,
    )
    _show(render_estimate(result), json_path, result.to_dict)


def _show(text: str, json_path: str, data: Callable[[], dict[str, Any]]) -> None:
    """Print an estimate's table and write its JSON (``data()``, when asked), a signal
    held until both are done."""
    from bsfinder.core.results import write_text_atomic

    _hold_signals()
    click.echo(text)
    if json_path:
        write_text_atomic(json_path, json.dumps(data(), indent=2))
        click.echo(f"wrote {json_path}")
    _signal_exit()


def _frontier(
    model: str,
    workload: dict[str, Any],
    target: str,
    target_memory: str | None,
    batch_sizes: tuple[int, ...],
    sequence_lengths: tuple[int, ...],
    *,
    json_path: str,
    **options: Any,
) -> None:
    """``--seq-len``: the largest batch per sequence length, as a table."""
    from bsfinder.api import estimate_frontier
    from bsfinder.report.estimate import render_frontier

    if batch_sizes:
        raise click.UsageError("--seq-len searches the largest batch per length: drop --batch")
    inputs = workload.pop("inputs")
    points = estimate_frontier(
        model, sequence_lengths=sequence_lengths, inputs=inputs, target=target,
        target_memory=target_memory, **workload, **options,
    )  # fmt: skip
    _show(render_frontier(points, target=target), json_path, lambda: {
        "kind": "estimate-frontier", "schema_version": 1,
        "points": [p._asdict() for p in points],
    })  # fmt: skip


def _what_if(
    model: str,
    workload: dict[str, Any],
    target: str,
    target_memory: str | None,
    ranks: int,
    *,
    json_path: str,
    **options: Any,
) -> None:
    """``--what-if``: precision x checkpointing, on one device and per rank, as a table."""
    from bsfinder.api import estimate_what_if
    from bsfinder.report.estimate import render_what_if

    given = {k: workload.pop(k) for k in ("precision", "checkpointing")}

    def progress(precision: str, checkpointing: str) -> None:
        click.echo(f"  tracing {precision}, checkpointing {checkpointing} ...", err=True)

    rows = estimate_what_if(
        model, ranks=ranks, target=target, target_memory=target_memory, on_line=progress,
        **workload, **options,
    )  # fmt: skip
    text = render_what_if(rows, target=target, target_memory=target_memory, ranks=ranks,
                          given=given)  # fmt: skip
    _show(text, json_path, lambda: {
        "kind": "estimate-what-if", "schema_version": 1, "target": target,
        "target_memory": target_memory, "ranks": ranks, "rows": [r._asdict() for r in rows],
    })  # fmt: skip
