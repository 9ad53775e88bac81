"""``bsfinder scale-out``: plan ranks from a saved result."""

from __future__ import annotations

import json
from typing import Any

import click

from bsfinder.cli._output import _load_result, _require_writable, errors_to_exit_codes


@click.command("scale-out")
@click.argument("result_path", metavar="RESULT.json", type=click.Path(dir_okay=False))
@click.option(
    "--strategy",
    "strategies",
    type=click.Choice(["ddp", "fsdp"]),
    multiple=True,
    help="Strategy to estimate (repeatable) [both].",
)
@click.option(
    "--ranks",
    "rank_counts",
    type=click.IntRange(min=1),
    multiple=True,
    help="Ranks sharing the model (repeatable) [2, 4, 8].",
)
@click.option(
    "--memory",
    default=None,
    metavar="BYTES",
    help="The memory of each rank of the plan (not the probe's budget), e.g. 80GiB "
    "[the probe's capacity].",
)
@click.option("--json", "json_path", default="", metavar="PATH", help="Also write JSON here.")
@errors_to_exit_codes
def scale_out(
    result_path: str,
    strategies: tuple[str, ...],
    rank_counts: tuple[int, ...],
    memory: str | None,
    json_path: str,
) -> None:
    """Per-rank memory and the largest batch under DDP or FSDP, from a single-device probe.

    RESULT.json is a `bsfinder probe` result from one device, or a `bsfinder estimate`
    result (with --target-memory or a card preset). Activations per sample are that
    device's; the weights, gradients and optimizer state are shared out by strategy.
    """
    from dataclasses import asdict

    from bsfinder.core.results import write_text_atomic
    from bsfinder.core.scaleout import scale_out as estimate_ranks
    from bsfinder.options import size_bytes
    from bsfinder.report import render_scale_out

    _require_writable(("--json", json_path, True))
    rank_memory_bytes = size_bytes(memory, "--memory")
    result = _load_plan_source(result_path, rank_memory_bytes is not None)
    estimates = [
        estimate_ranks(result, strategy, ranks, capacity_bytes=rank_memory_bytes)
        for strategy in strategies or ("ddp", "fsdp")
        for ranks in rank_counts or (2, 4, 8)
    ]
    click.echo(render_scale_out(estimates))
    if json_path:
        data = [{**asdict(e), "global_max_batch": e.global_max_batch} for e in estimates]
        write_text_atomic(json_path, json.dumps(data, indent=2))
        click.echo(f"wrote {json_path}")


def _load_plan_source(path: str, memory_given: bool) -> Any:
    """A probe result, or an estimate result in the probe's shape (``kind: estimate``)."""
    from bsfinder.core.scaleout import probe_from_estimate
    from bsfinder.errors import SpecError

    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        data = None  # _load_result says what is wrong with the file
    if isinstance(data, dict) and data.get("kind") == "estimate":
        if not data.get("target", {}).get("memory_bytes") and not memory_given:
            raise SpecError(
                f"{path} is an estimate without a target memory: estimate with "
                "--target-memory or a card preset (--target h100-80gb), or pass --memory"
            )
        return probe_from_estimate(data)
    return _load_result(path)
