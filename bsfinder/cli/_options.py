"""The options shared by the commands that describe a training step."""

from __future__ import annotations

import functools
import json
from typing import Any

import click


def _granularity(value: str) -> int | str:
    if value == "pow2":
        return value
    try:
        number = int(value)
    except ValueError:
        raise click.BadParameter("use a positive integer (8, 1) or pow2") from None
    if number < 1:
        raise click.BadParameter("must be >= 1")
    return number


def _kwargs(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"depth\": 18}'")
    return parsed


_WORKLOAD_OPTIONS = (
    click.option(
        "--input",
        "inputs",
        multiple=True,
        metavar="SPEC",
        help="One sample's input, e.g. 3x224x224, 128:int64:50257, labels=:int64:10. "
        "Repeat for several inputs; NAME= passes it as a keyword.",
    ),
    click.option(
        "--model-kwargs",
        default=None,
        metavar="JSON",
        help="Keyword arguments for the model class or factory.",
    ),
    click.option(
        "--optimizer",
        default="adamw",
        show_default=True,
        type=click.Choice(["adamw", "adam", "sgd", "none"]),
    ),
    click.option(
        "--precision",
        default="32",
        show_default=True,
        type=click.Choice(["32", "bf16-mixed", "fp16-mixed"]),
    ),
    click.option(
        "--loss",
        default="auto",
        show_default=True,
        type=click.Choice(["auto", "mean", "cross-entropy"]),
        help="auto: the model's own loss if it returns one, else the mean of its outputs.",
    ),
    click.option(
        "--keep-outputs",
        is_flag=True,
        default=False,
        help="Keep the model's outputs (logits) alive through backward and the optimizer "
        "step, as a loop that holds them does (default: released once the loss is taken, "
        "as HF Trainer, Lightning and `loss = model(x).loss` loops do).",
    ),
)


_DEVICE_OPTION = click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."
)


def _workload_options(command: Any, *, device: bool = True) -> Any:
    """The options that describe the training step, shared by probe, profile and estimate,
    handed to the command as one ``workload`` dict of API arguments (``device`` only where
    the command runs on one)."""

    @functools.wraps(command)
    def with_workload(
        *args: Any,
        inputs: tuple[str, ...],
        model_kwargs: str | None,
        optimizer: str,
        precision: str,
        loss: str,
        keep_outputs: bool,
        **kwargs: Any,
    ) -> Any:
        workload = {
            "inputs": list(inputs),
            "model_kwargs": _kwargs(model_kwargs),
            "optimizer": optimizer,
            "precision": precision,
            "loss": loss,
            "keep_outputs": keep_outputs,
        }
        if device:
            workload["device"] = kwargs.pop("device")
        return command(*args, workload=workload, **kwargs)

    options = (*_WORKLOAD_OPTIONS, _DEVICE_OPTION) if device else _WORKLOAD_OPTIONS
    for option in reversed(options):
        with_workload = option(with_workload)
    return with_workload
