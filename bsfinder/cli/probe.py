"""``bsfinder probe``: the largest batch that fits, the time-optimal batch, its learning rate."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from bsfinder.cli import _output, _signals
from bsfinder.cli._options import (
    _GRANULARITY_OPTION,
    _MEMORY_LIMIT_OPTION,
    _checked,
    _max_batch_option,
    _workload_options,
)
from bsfinder.cli._output import (
    _echo,
    _plot,
    _Progress,
    _require_writable,
    _stdout_for_json,
    errors_to_exit_codes,
)
from bsfinder.cli._signals import _hold_signals, _signal_exit
from bsfinder.errors import BsfinderError, SpecError
from bsfinder.options import (
    ExecutionOptions,
    Granularity,
    RecommendOptions,
    SearchOptions,
    choices_of,
    help_of,
)


def _rank_prefix() -> str:
    """``[rank N] `` before the error of a rank other than 0 under torchrun (rank 0 speaks for
    them all, without one)."""
    from bsfinder.execution.distributed import launch_env

    try:
        launched = launch_env()
    except BsfinderError:  # torchrun's environment is malformed: that is the error reported
        return ""
    rank = launched["rank"] if launched is not None else 0
    return f"[rank {rank}] " if rank else ""


@click.command()
@click.argument("model")
@_workload_options
@_MEMORY_LIMIT_OPTION
@_max_batch_option("Never try a larger batch.")
@click.option(
    "--start-batch",
    type=int,
    default=SearchOptions.start_batch,
    show_default=True,
    callback=_checked(SearchOptions, "start_batch"),
)
@_GRANULARITY_OPTION
@click.option(
    "--headroom",
    type=float,
    default=RecommendOptions.headroom,
    show_default=True,
    help=help_of(RecommendOptions, "headroom"),
    callback=_checked(RecommendOptions, "headroom"),
)
@click.option(
    "--warmup-steps",
    type=int,
    default=ExecutionOptions.warmup_steps,
    show_default=True,
    callback=_checked(ExecutionOptions, "warmup_steps"),
)
@click.option(
    "--steps",
    type=int,
    default=ExecutionOptions.steps,
    show_default=True,
    help=help_of(ExecutionOptions, "steps"),
    callback=_checked(ExecutionOptions, "steps"),
)
@click.option(
    "--base-lr",
    type=float,
    default=RecommendOptions.base_lr,
    help=help_of(RecommendOptions, "base_lr"),
)
@click.option(
    "--base-batch",
    type=int,
    default=RecommendOptions.base_batch,
    callback=_checked(RecommendOptions, "base_batch"),
)
@click.option(
    "--lr-rule",
    default=RecommendOptions.lr_rule,
    show_default=True,
    type=click.Choice(choices_of(RecommendOptions, "lr_rule")),
    help=help_of(RecommendOptions, "lr_rule"),
)
@click.option(
    "--dataset-size",
    type=int,
    default=RecommendOptions.dataset_size,
    help=help_of(RecommendOptions, "dataset_size"),
    callback=_checked(RecommendOptions, "dataset_size"),
)
@click.option(
    "--data",
    default=None,
    metavar="SPEC",
    help="module:make_loader; make_loader(batch_size) yields real batches (tuples passed to "
    "the model): measures the gradient noise scale for the time-optimal batch, then finds "
    "the LR at it (an LR range test).",
)
@click.option(
    "--checkpoint",
    default=None,
    metavar="PATH",
    help="A state_dict to load before measuring the noise scale (it grows during training).",
)
@click.option(
    "--global-batch",
    type=int,
    default=RecommendOptions.global_batch,
    help=help_of(RecommendOptions, "global_batch"),
    callback=_checked(RecommendOptions, "global_batch"),
)
@click.option(
    "--gpus",
    type=int,
    default=RecommendOptions.gpus,
    show_default=True,
    help=help_of(RecommendOptions, "gpus"),
    callback=_checked(RecommendOptions, "gpus"),
)
@click.option(
    "--strategy",
    type=click.Choice(choices_of(ExecutionOptions, "strategy")),
    default=ExecutionOptions.strategy,
    help=help_of(ExecutionOptions, "strategy"),
)
@click.option(
    "--isolation",
    # the CLI's own choices and default (the API's default is ExecutionOptions.isolation)
    default="process",
    show_default=True,
    type=click.Choice(["process", "inline"]),
    help="process: a worker restarted after every failure; inline: this process.",
)
@click.option(
    "--no-memory-model",
    is_flag=True,
    help="Plain bisection instead of jumping along the fitted memory line.",
)
@click.option(
    "--time-limit",
    default=f"{SearchOptions.time_limit:g}s",
    show_default=True,
    metavar="DURATION",
    help=help_of(SearchOptions, "time_limit"),
    callback=_checked(SearchOptions, "time_limit"),
)
@click.option(
    "--trial-timeout",
    # the CLI's floor: a second (the API takes any positive number)
    type=click.FloatRange(min=1),
    default=ExecutionOptions.trial_timeout_s,
    metavar="SECONDS",
    help=help_of(ExecutionOptions, "trial_timeout_s"),
)
@click.option(
    "--json",
    "json_path",
    default="bsfinder-result.json",
    show_default=True,
    metavar="PATH",
    help="Where to write the result ('-' for stdout, '' to skip).",
)
@click.option(
    "--quiet", is_flag=True, help="No progress display and no table: only the recommendations."
)
@click.option(
    "--plot",
    "plot_path",
    default="",
    metavar="PNG",
    help="Draw throughput and memory by batch here, and the LR range test's curve with "
    "--data (needs matplotlib: bsfinder[plot]).",
)
@errors_to_exit_codes(prefix=_rank_prefix)
def probe(
    model: str,
    workload: dict[str, Any],
    memory_limit: str | None,
    max_batch: int | None,
    start_batch: int,
    granularity: Granularity,
    headroom: float,
    warmup_steps: int,
    steps: int,
    base_lr: float | None,
    base_batch: int | None,
    lr_rule: str,
    dataset_size: int | None,
    data: str | None,
    checkpoint: str | None,
    global_batch: int | None,
    gpus: int,
    strategy: str | None,
    isolation: str,
    no_memory_model: bool,
    time_limit: float | None,
    trial_timeout: float | None,
    json_path: str,
    quiet: bool,
    plot_path: str,
) -> None:
    """Find the largest batch that trains, the time-optimal batch and its learning rate.

    MODEL is pkg.module:Name or path/to/file.py:Name, an nn.Module class or a factory.
    Under torchrun every rank probes together; rank 0 prints and writes the result.
    """
    from bsfinder.api import find_batch_size
    from bsfinder.execution.distributed import launch_env

    launched = launch_env()
    rank = launched["rank"] if launched is not None else 0
    if rank != 0:  # every rank probes; rank 0 speaks for them
        quiet, plot_path = True, ""
        json_path = ""
    _require_writable(("--json", json_path, True), ("--plot", plot_path, False))
    _stdout_for_json(json_path)
    try:
        result = find_batch_size(
            model,
            **workload,
            memory_limit=memory_limit,
            max_batch=max_batch,
            start_batch=start_batch,
            granularity=granularity,
            headroom=headroom,
            warmup_steps=warmup_steps,
            steps=steps,
            base_lr=base_lr,
            base_batch=base_batch,
            lr_rule=lr_rule,
            dataset_size=dataset_size,
            data=data,
            checkpoint=checkpoint,
            global_batch=global_batch,
            gpus=gpus,
            strategy=strategy or ("ddp" if launched is not None else None),
            isolation=isolation,
            memory_model=not no_memory_model,
            time_limit=time_limit,
            trial_timeout_s=trial_timeout,
            on_event=_Progress(quiet),
        )
    except KeyboardInterrupt:  # while starting (importing torch, saving the model)
        _stopped_before_any_trial()
    except BsfinderError as exc:
        # every rank raised it (an error the ranks agreed on, or bad input: the arguments are
        # the same on every rank): rank 0 reports it
        if rank != 0 and (exc.agreed or isinstance(exc, SpecError)):
            sys.exit(exc.exit_code)
        # a failure after the search (the data loader, the noise scale) keeps its trials
        measured = getattr(exc, "result", None)
        if rank == 0 and measured is not None and measured.trials:
            _hold_signals()
            _write_probe(measured, quiet=quiet, json_path=json_path, plot_path=plot_path)
        raise  # reported as every command's error is, with _rank_prefix()
    _hold_signals()  # the result is complete, or all there is: a signal now waits for it
    if rank != 0:
        _signal_exit(130 if result.interrupted else 0 if result.max_batch is not None else 1)
    if result.interrupted and not result.trials:  # stopped while the worker started
        _stopped_before_any_trial()
    _write_probe(result, quiet=quiet, json_path=json_path, plot_path=plot_path)
    _signal_exit()
    if result.interrupted:
        sys.exit(130)
    if result.max_batch is None and not result.partial:
        sys.exit(1)


def _stopped_before_any_trial() -> NoReturn:
    """One line and ``128 + signal``: a probe stopped before it measured anything writes
    nothing (an earlier result at the --json path stays)."""
    _hold_signals()
    name = _signals._STOP.name if _signals._STOP is not None else "SIGINT"
    click.echo(
        f"interrupted by {name} before the first trial: nothing measured, nothing written",
        err=True,
    )
    sys.exit(_signals._STOP.exit_code if _signals._STOP is not None else 130)


def _write_probe(result: Any, *, quiet: bool, json_path: str, plot_path: str) -> None:
    """Print a probe's trials and summary, draw its plot, write its JSON."""
    from bsfinder.report import render_summary, render_trials

    if not quiet and result.trials:
        _echo(render_trials(result))
        click.echo()
    _echo(render_summary(result))
    if plot_path:
        try:
            _plot(result, plot_path)
        except BsfinderError as exc:
            click.echo(f"error: {exc} (the result is still written)", err=True)
    if json_path == "-":
        click.echo(result.to_json(), file=_output._JSON_STDOUT)
    elif json_path:
        result.save(json_path)
        if not quiet:
            click.echo(f"wrote {json_path}")
