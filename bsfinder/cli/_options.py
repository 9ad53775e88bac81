"""The options shared by the commands that describe a training step, and the bridge from a
flag to its option in :mod:`bsfinder.options` (default, help and check declared there)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from bsfinder.errors import SpecError
from bsfinder.options import (
    BudgetOptions,
    ExecutionOptions,
    SearchOptions,
    WorkloadOptions,
    check_option,
    choices_of,
    help_of,
)


def _checked(group: Any, name: str, parse: Callable[[Any], Any] | None = None) -> Any:
    """A click callback that runs the option's own check (its SpecError becomes a usage
    error, exit code 2); ``parse`` turns the flag's text into the API's value first."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return check_option(group, name, parse(value) if parse else value)
        except SpecError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def _granularity_text(value: str) -> int | str:
    """``pow2`` or a number; other text goes on to the check, which refuses it."""
    if value == "pow2":
        return value
    try:
        return int(value)
    except ValueError:
        return value


#: ``--granularity``, for the commands that search (probe, estimate)
_GRANULARITY_OPTION = click.option(
    "--granularity",
    default=str(SearchOptions.granularity),
    show_default=True,
    help=help_of(SearchOptions, "granularity"),
    callback=_checked(SearchOptions, "granularity", _granularity_text),
)


#: ``--memory-limit``: the user's budget, checked by the API with the device it runs on (a CPU
#: budget's range depends on this machine), so a bad one is a one-line error
_MEMORY_LIMIT_OPTION = click.option(
    "--memory-limit",
    default=BudgetOptions.memory_limit,
    metavar="SIZE",
    help=help_of(BudgetOptions, "memory_limit"),
)


def _max_batch_option(help: str) -> Any:
    return click.option(
        "--max-batch",
        type=int,
        default=SearchOptions.max_batch,
        help=help,
        callback=_checked(SearchOptions, "max_batch"),
    )


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


def _choice_option(flag: str, name: str) -> Any:
    """A workload option with a fixed set of values: its default, choices and help, as
    :class:`~bsfinder.options.WorkloadOptions` declares them."""
    return click.option(
        flag,
        default=getattr(WorkloadOptions, name),
        show_default=True,
        type=click.Choice(choices_of(WorkloadOptions, name)),
        help=help_of(WorkloadOptions, name),
    )


_WORKLOAD_OPTIONS = (
    click.option(
        "--input",
        "inputs",
        multiple=True,
        metavar="SPEC",
        help=help_of(WorkloadOptions, "inputs"),
    ),
    click.option(
        "--model-kwargs",
        default=WorkloadOptions.model_kwargs,
        metavar="JSON",
        help=help_of(WorkloadOptions, "model_kwargs"),
    ),
    click.option(
        "--optimizer",
        default=WorkloadOptions.optimizer,
        show_default=True,
        type=click.Choice(choices_of(WorkloadOptions, "optimizer")),
    ),
    _choice_option("--precision", "precision"),
    _choice_option("--loss", "loss"),
    _choice_option("--mode", "mode"),
    click.option(
        "--batches",
        default=WorkloadOptions.batches,
        metavar="SPEC",
        help=help_of(WorkloadOptions, "batches"),
    ),
    click.option(
        "--forward-kwargs",
        default=WorkloadOptions.forward_kwargs,
        metavar="JSON",
        help=help_of(WorkloadOptions, "forward_kwargs"),
    ),
    _choice_option("--checkpointing", "checkpointing"),
    click.option(
        "--keep-outputs",
        is_flag=True,
        default=WorkloadOptions.keep_outputs,
        help=help_of(WorkloadOptions, "keep_outputs"),
    ),
)


_DEVICE_OPTION = click.option(
    "--device",
    default=ExecutionOptions.device,
    show_default=True,
    help=help_of(ExecutionOptions, "device"),
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
        checkpointing: str,
        mode: str,
        batches: str | None,
        forward_kwargs: str | None,
        **kwargs: Any,
    ) -> Any:
        workload = {
            "inputs": list(inputs),
            "model_kwargs": _kwargs(model_kwargs),
            "optimizer": optimizer,
            "precision": precision,
            "loss": loss,
            "keep_outputs": keep_outputs,
            "checkpointing": checkpointing,
            "mode": mode,
        }
        if forward_kwargs:
            workload["forward_kwargs"] = _kwargs(forward_kwargs)
        if batches is not None:
            if not device:
                raise click.UsageError(
                    "--batches: an estimate traces fake tensors, not real samples; estimate "
                    "with --input specs of your longest sample, or probe with --batches"
                )
            workload["batches"] = batches
        if device:
            workload["device"] = kwargs.pop("device")
        return command(*args, workload=workload, **kwargs)

    options = (*_WORKLOAD_OPTIONS, _DEVICE_OPTION) if device else _WORKLOAD_OPTIONS
    for option in reversed(options):
        with_workload = option(with_workload)
    return with_workload
