"""``bsfinder lr``: the LR range test on your model and data, at one batch."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from bsfinder.cli._options import _DEVICE_OPTION, _kwargs
from bsfinder.cli._output import (
    STEP_LINE_EVERY,
    _live,
    _require_writable,
    errors_to_exit_codes,
)
from bsfinder.cli._signals import _hold_signals, _signal_exit
from bsfinder.core.lr_range import DEFAULT_RULE, RULES
from bsfinder.lr.range_test import LR_END, LR_START, LR_STEPS, OPTIMIZERS
from bsfinder.options import WorkloadOptions, choices_of


@click.command()
@click.argument("model")
@click.option(
    "--data",
    required=True,
    metavar="SPEC",
    help="module:make_loader; make_loader(batch_size) yields real training batches.",
)
@click.option(
    "--batch",
    "batch_size",
    type=click.IntRange(min=1),
    required=True,
    help="The batch to sweep at: the one you will train with.",
)
@click.option(
    "--optimizer",
    default="adamw",
    show_default=True,
    type=click.Choice(OPTIMIZERS),
    help="sgd: momentum 0.9; adamw/adam: torch's.",
)
@click.option(
    "--rule",
    default=DEFAULT_RULE,
    show_default=True,
    type=click.Choice(RULES),
    help="How the suggestion is read from the curve.",
)
@click.option("--start-lr", default=LR_START, show_default=True, type=float)
@click.option("--end-lr", default=LR_END, show_default=True, type=float)
@click.option("--steps", default=LR_STEPS, show_default=True, type=click.IntRange(min=20))
@click.option(
    "--loss",
    default=WorkloadOptions.loss,
    show_default=True,
    type=click.Choice([c for c in choices_of(WorkloadOptions, "loss") if c != "mean"]),
)
@click.option(
    "--precision",
    default=WorkloadOptions.precision,
    show_default=True,
    type=click.Choice(choices_of(WorkloadOptions, "precision")),
)
@click.option("--model-kwargs", default=None, metavar="JSON")
@click.option(
    "--checkpoint", default=None, metavar="PATH", help="A state_dict to load into the model first."
)
@_DEVICE_OPTION
@click.option(
    "--isolation", default="process", show_default=True, type=click.Choice(["process", "inline"])
)
@click.option("--json", "json_path", default="", metavar="PATH", help="Also write JSON here.")
@errors_to_exit_codes
def lr(
    model: str,
    data: str,
    batch_size: int,
    optimizer: str,
    rule: str,
    start_lr: float,
    end_lr: float,
    steps: int,
    loss: str,
    precision: str,
    model_kwargs: str | None,
    checkpoint: str | None,
    device: str,
    isolation: str,
    json_path: str,
) -> None:
    """Find the learning rate: an LR range test (Smith 2017) at --batch on your data.

    Trains a fresh copy of the model while the learning rate grows exponentially from
    --start-lr, records every step's loss, stops when the smoothed loss diverges, and reads
    the suggestion from the curve (--rule). Ctrl-C or SIGTERM keeps the steps measured.
    """
    from bsfinder.core.results import write_text_atomic
    from bsfinder.devices.select import resolve_device
    from bsfinder.lr import find_lr
    from bsfinder.report.lr import render_lr_range

    _require_writable(("--json", json_path, True))
    kwargs: dict[str, Any] = _kwargs(model_kwargs)
    click.echo(
        f"LR range test at batch {batch_size}: up to {steps} steps from lr {start_lr:g} to "
        f"{end_lr:g}" + (" (a fresh process starts first)" if isolation == "process" else ""),
        err=True,
    )
    found = find_lr(
        model, data, batch_size=batch_size, optimizer=optimizer, rule=rule,
        start_lr=start_lr, end_lr=end_lr, steps=steps, device=resolve_device(device),
        loss=loss, precision=precision, checkpoint=checkpoint, model_kwargs=kwargs,
        isolation=isolation, on_step=_StepProgress(steps),
    )  # fmt: skip
    _hold_signals()
    if sys.stderr.isatty():
        _live()
    click.echo(render_lr_range(found))
    if json_path:
        write_text_atomic(json_path, json.dumps(found.to_dict(), indent=2))
        click.echo(f"wrote {json_path}")
    _signal_exit(130 if found.interrupted else None)


class _StepProgress:
    """The sweep's progress on stderr: a live line on a terminal, else a line at the first
    step and every :data:`STEP_LINE_EVERY` after it."""

    def __init__(self, steps: int) -> None:
        self.steps, self.live = steps, sys.stderr.isatty()

    def __call__(self, step: int, lr: float, loss: float) -> None:
        text = f"  step {step:>3}/{self.steps}  lr {lr:<9.3g} loss {loss:.4g}"
        if self.live:
            _live(text + "   ")
        elif step == 1 or step % STEP_LINE_EVERY == 0:
            click.echo(text, err=True)
