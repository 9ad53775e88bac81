"""The command line: the only module that prints or imports click."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import time
import traceback
from typing import Any, NoReturn

import click

from bsfinder.errors import BsfinderError, SpecError, UserCodeError
from bsfinder.probe import ProbeEvent
from bsfinder.units import format_bytes

__all__ = ["main"]


class _Stop:
    """SIGINT and SIGTERM while a command runs (``timeout``, Slurm, ``docker stop`` and a
    cancelled CI job send SIGTERM; torchrun sends it to its ranks after a Ctrl-C).

    The first signal stops the command as Ctrl-C does (a ``KeyboardInterrupt``: the probe
    keeps its trials); later ones are held until the clean stop has written what was
    measured, so a second Ctrl-C cannot lose it (one more than ``RESTOP_S`` after the first
    stops again: the first was lost). Once ``holding`` (the result is complete
    and being written), a first signal is only remembered. The command then exits with
    ``128 + signal``: 130 for SIGINT, 143 for SIGTERM.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    #: a clean stop takes well under this (measured: 0.03 s, 1.05 s with a hung trial to
    #: kill); a signal later than this means the first was lost (raised inside a finalizer,
    #: where Python only prints it, or swallowed by the model's code): it stops again
    RESTOP_S = 3.0

    def __init__(self) -> None:
        self.signum: int | None = None
        self.holding = False
        self._first_at = 0.0
        self._told = False
        self._previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            if not self.holding:
                raise KeyboardInterrupt
        elif not self.holding and time.monotonic() - self._first_at > self.RESTOP_S:
            raise KeyboardInterrupt
        elif not self._told:
            self._told = True
            # os.write: click.echo from a handler can re-enter a write in progress
            os.write(2, b"\nstill stopping: writing what was measured first\n")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def install(self) -> None:
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self)
            except ValueError:  # not the main thread (an embedding caller): leave signals be
                return

    def restore(self) -> None:
        """Put the previous handlers back; after a signal, ignore further ones instead: the
        process is exiting, and a second Ctrl-C 50 ms after the first (the clean stop takes
        less) would otherwise kill it by SIGINT (exit -2) on its way out."""
        for signum, previous in self._previous.items():
            if previous is None:  # set from C: nothing Python can put back
                previous = signal.SIG_DFL
            signal.signal(signum, previous if self.signum is None else signal.SIG_IGN)
        self._previous.clear()
        if self.signum is not None:
            # A KeyboardInterrupt raised inside code that C runs through PyRun_String
            # (pybind11's py::exec in torch) sets CPython's "unhandled KeyboardInterrupt"
            # flag, and the interpreter then kills itself by SIGINT at exit (exit -2 instead
            # of 130: 2 of 10 estimates interrupted 2 s in). Any PyRun_String clears it.
            with contextlib.suppress(Exception):
                import ctypes

                ctypes.pythonapi.PyRun_SimpleString(b"pass")


#: the signal state of the command running now (set by ``main``)
_STOP: _Stop | None = None


def _hold_signals() -> None:
    """From here on a signal no longer stops the command: the result is being written."""
    if _STOP is not None:
        _STOP.holding = True


def _signal_exit(default: int | None = None) -> None:
    """Exit ``128 + signal`` when a signal came (``default`` if given and none did)."""
    if _STOP is not None and _STOP.signum is not None:
        sys.exit(_STOP.exit_code)
    if default is not None:
        sys.exit(default)


class _Main(click.Group):
    """The command group: SIGINT and SIGTERM handled as :class:`_Stop` says, and an
    interrupt that reaches here (start-up, profile, estimate) one line and ``128 + signal``
    instead of click's "Aborted!" and exit 1."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        global _STOP
        outer, _STOP = _STOP, _Stop()
        _STOP.install()
        try:
            return super().main(*args, **kwargs)
        finally:
            _STOP.restore()
            _STOP = outer

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            stop = _STOP or _Stop()
            what = ctx.invoked_subcommand or "bsfinder"
            click.echo(f"interrupted by {stop.name}: {what} stopped, nothing written", err=True)
            sys.exit(stop.exit_code)


def _fail(exc: BsfinderError, debug: bool, prefix: str = "") -> NoReturn:
    if debug:
        if isinstance(exc, UserCodeError) and exc.traceback_text:
            click.echo(exc.traceback_text.rstrip(), err=True)
        else:
            click.echo(traceback.format_exc().rstrip(), err=True)
    click.echo(f"{prefix}error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _colour(err: bool = False) -> bool:
    """Colour on a terminal unless NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    return (sys.stderr if err else sys.stdout).isatty()


def _echo(text: str, err: bool = False) -> None:
    """Echo with fits in green and failures and regressions in red, on a terminal only."""
    if _colour(err):
        from bsfinder.report.table import FIT, NO_FIT

        for word, colour in ((FIT, "green"), (NO_FIT, "red"), ("REGRESSION", "red")):
            text = text.replace(
                word, click.style(word, fg=colour, bold=word == "REGRESSION" or None)
            )
    click.echo(text, err=err, color=_colour(err))


def _bar(done: int, total: int, width: int = 12) -> str:
    filled = round(width * done / total) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


class _Progress:
    """Per-trial progress on stderr: a live step counter on a terminal, lines otherwise."""

    def __init__(self, quiet: bool, default_budget: bool = False) -> None:
        self.quiet = quiet
        self.default_budget = default_budget
        self.live = sys.stderr.isatty()
        self.capacity: int | None = None

    def __call__(self, event: ProbeEvent) -> None:
        from bsfinder.report import render_trial_line

        if self.quiet:
            return
        if event.kind == "started" and event.info is not None:
            dev = event.info.device
            label = "budget" if dev.get("kind") == "cpu" else "capacity"
            self.capacity = event.info.capacity_bytes
            dist = event.info.workload.get("distributed")
            ranks = (
                f" on {dist['world_size']} ranks ({dist['strategy']} over {dist['backend']}), "
                f"the smallest {label}"
                if dist
                else ""
            )
            click.echo(
                f"probing {dev.get('device', '?')} ({dev.get('name') or '?'}){ranks}, "
                f"{label} {format_bytes(self.capacity)}",
                err=True,
            )
            if self.default_budget and dev.get("kind") == "cpu":
                from bsfinder.devices.cpu import cpu_budget_default

                # the API's rule (api._prepared), said again: what bound it, and the share
                source = cpu_budget_default()[1]
                share = int((dist or {}).get("local_world_size") or 1)
                if share > 1:
                    source += f", shared by the {share} ranks on this node"
                click.echo(
                    f"  ({source}; large CPU budgets make long probes: "
                    "--memory-limit sets the budget)",
                    err=True,
                )
        elif event.kind == "trial" and self.live:
            click.echo(
                f"\r  trial {event.index:>2}  batch {event.batch_size:>6}  starting",
                nl=False,
                err=True,
            )
        elif event.kind == "step" and self.live:
            click.echo(
                f"\r  trial {event.index:>2}  batch {event.batch_size:>6}  "
                f"{_bar(event.step, event.total_steps)} step {event.step}/{event.total_steps}   ",
                nl=False,
                err=True,
            )
        elif event.kind == "trial-done" and event.trial is not None:
            line = render_trial_line(event.index, event.trial, self.capacity)
            _echo(("\r\033[K" if self.live else "") + line, err=True)
        elif event.kind == "noise":
            click.echo(
                f"measuring the gradient noise scale on your data: groups of 4 batches of "
                f"{event.batch_size}, up to ~10 s",
                err=True,
            )


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


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bsfinder")
def main() -> None:
    """Which batch size, and which learning rate: measured on real training steps."""


@main.command()
@click.argument("model")
@_workload_options
@click.option(
    "--memory-limit",
    default=None,
    metavar="SIZE",
    help="CPU: the memory budget (default 90% of the available RAM, or of the container's "
    "memory limit minus its use if less). "
    "GPU: cap the allocator, e.g. 24GiB.",
)
@click.option(
    "--max-batch", type=click.IntRange(min=1), default=None, help="Never try a larger batch."
)
@click.option("--start-batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--granularity",
    default="8",
    show_default=True,
    help="Answer to a multiple of this; 1 for exact; pow2.",
)
@click.option(
    "--headroom",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.05,
    show_default=True,
    help="Fraction of capacity the safe batch leaves free.",
)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=1, show_default=True)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Timed steps per trial.",
)
@click.option(
    "--base-lr", type=float, default=None, help="A learning rate known to work at --base-batch."
)
@click.option("--base-batch", type=click.IntRange(min=1), default=None)
@click.option(
    "--lr-rule",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "linear", "sqrt", "noise", "none"]),
    help="auto: SGD linear (noise-capped with --data), Adam-family sqrt.",
)
@click.option(
    "--dataset-size",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per epoch (warm-up in steps).",
)
@click.option(
    "--data",
    default=None,
    metavar="SPEC",
    help="module:make_loader; make_loader(batch_size) yields real batches (tuples passed to "
    "the model): measures the gradient noise scale for the time-optimal batch and LR.",
)
@click.option(
    "--checkpoint",
    default=None,
    metavar="PATH",
    help="A state_dict to load before measuring the noise scale (it grows during training).",
)
@click.option(
    "--global-batch",
    type=click.IntRange(min=1),
    default=None,
    help="Plan micro-batch x accumulation x GPUs for this global batch.",
)
@click.option(
    "--gpus", type=click.IntRange(min=1), default=1, show_default=True, help="Ranks to plan for."
)
@click.option(
    "--strategy",
    type=click.Choice(["ddp", "fsdp", "none"]),
    default=None,
    help="Under torchrun, probe on every rank with the model in DDP (the default there) or "
    "FSDP2 (none: unwrapped); without torchrun, a world of one rank.",
)
@click.option(
    "--isolation",
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
    "--trial-timeout",
    type=click.FloatRange(min=1),
    default=None,
    metavar="SECONDS",
    help="Longest silence before any step is timed (start-up, first trial; default 900); "
    "after that a trial may go 10x its predicted step time without progress, at least 30 s "
    "or this when given, before it is stopped and judged a hang.",
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
    help="Draw throughput and memory by batch here (needs matplotlib: bsfinder[plot]).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def probe(
    model: str,
    workload: dict[str, Any],
    memory_limit: str | None,
    max_batch: int | None,
    start_batch: int,
    granularity: str,
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
    trial_timeout: float | None,
    json_path: str,
    quiet: bool,
    plot_path: str,
    debug: bool,
) -> None:
    """Find the largest batch that trains, the time-optimal batch and its learning rate.

    MODEL is pkg.module:Name or path/to/file.py:Name, an nn.Module class or a factory.
    Under torchrun every rank probes together; rank 0 prints and writes the result.
    """
    from bsfinder.api import find_batch_size
    from bsfinder.distributed import launch_env

    try:
        launched = launch_env()
    except BsfinderError as exc:
        _fail(exc, debug)
    rank = launched["rank"] if launched is not None else 0
    if rank != 0:  # every rank probes; rank 0 speaks for them
        quiet, plot_path = True, ""
        json_path = ""
    _require_writable(debug, ("--json", json_path, True), ("--plot", plot_path, False))
    _stdout_for_json(json_path)
    try:
        result = find_batch_size(
            model,
            **workload,
            memory_limit=memory_limit,
            max_batch=max_batch,
            start_batch=start_batch,
            granularity=_granularity(granularity),  # type: ignore[arg-type]
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
            trial_timeout_s=trial_timeout,
            on_event=_Progress(quiet, default_budget=memory_limit is None),
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
        _fail(exc, debug, prefix=f"[rank {rank}] " if rank else "")
    _hold_signals()  # the result is complete, or all there is: a signal now waits for it
    if rank != 0:
        _signal_exit(130 if result.interrupted else 0 if result.max_batch is not None else 1)
    if result.interrupted and not result.trials:  # stopped while the worker started
        _stopped_before_any_trial()
    _write_probe(result, quiet=quiet, json_path=json_path, plot_path=plot_path)
    _signal_exit()
    if result.interrupted:
        sys.exit(130)
    if result.max_batch is None:
        sys.exit(1)


def _stopped_before_any_trial() -> NoReturn:
    """One line and ``128 + signal``: a probe stopped before it measured anything writes
    nothing (an earlier result at the --json path stays)."""
    _hold_signals()
    name = _STOP.name if _STOP is not None else "SIGINT"
    click.echo(
        f"interrupted by {name} before the first trial: nothing measured, nothing written",
        err=True,
    )
    sys.exit(_STOP.exit_code if _STOP is not None else 130)


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
        click.echo(result.to_json(), file=_JSON_STDOUT)
    elif json_path:
        result.save(json_path)
        if not quiet:
            click.echo(f"wrote {json_path}")


@main.command()
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
    from bsfinder.report import render_profile
    from bsfinder.results import write_json_atomic

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


@main.command()
@click.argument("model")
@functools.partial(_workload_options, device=False)
@click.option(
    "--target",
    default="cuda",
    show_default=True,
    type=click.Choice(["cuda", "cpu"]),
    help="The device to plan for (the estimate itself runs here, on CPU).",
)
@click.option(
    "--target-memory",
    default=None,
    metavar="BYTES",
    help="The target's memory, e.g. 24GiB or 80GiB: find the largest batch.",
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
    "--granularity",
    default="8",
    show_default=True,
    help="Answer to a multiple of this; 1 for exact, pow2 for powers of two.",
)
@click.option(
    "--max-batch", type=click.IntRange(min=1), default=None, help="Never estimate a larger batch."
)
@click.option(
    "--no-scratch",
    is_flag=True,
    help="CPU target: do not measure oneDNN's convolution scratch (no real convolutions run).",
)
@click.option("--json", "json_path", default="", metavar="PATH", help="Also write JSON here.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def estimate(
    model: str,
    workload: dict[str, Any],
    target: str,
    target_memory: str | None,
    batch_sizes: tuple[int, ...],
    context: str | None,
    workspace: str | None,
    granularity: str,
    max_batch: int | None,
    no_scratch: bool,
    json_path: str,
    debug: bool,
) -> None:
    """Peak memory of a training step on a device you do not have, and the largest batch.

    Traces one step with fake tensors (no memory is allocated, no GPU is needed) and adds
    what the target holds outside tensors; lists what it cannot see.
    """
    from bsfinder.api import estimate_memory
    from bsfinder.report import render_estimate
    from bsfinder.results import write_json_atomic

    _require_writable(debug, ("--json", json_path, True))
    try:
        result = estimate_memory(
            model,
            **workload,
            batch_sizes=batch_sizes,
            target=target,
            target_memory=target_memory,
            context=context,
            workspace=workspace,
            granularity=_granularity(granularity),  # type: ignore[arg-type]
            max_batch=max_batch,
            kernel_scratch=not no_scratch,
        )
    except BsfinderError as exc:
        _fail(exc, debug)
    _hold_signals()
    click.echo(render_estimate(result))
    if json_path:
        write_json_atomic(json_path, json.dumps(result.to_dict(), indent=2))
        click.echo(f"wrote {json_path}")
    _signal_exit()


@main.command()
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
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def compare(base: str, new: str, fail_on: tuple[str, ...], output_format: str, debug: bool) -> None:
    """Compare two probe results (BASE, NEW): deltas, and exit 1 on a regression.

    For CI: keep the main branch's result as BASE, probe the change, and gate on
    --fail-on thresholds. Warns when the device or software differ.
    """
    from bsfinder.compare import compare as compare_results
    from bsfinder.compare import parse_threshold
    from bsfinder.report.compare import render_comparison

    try:
        thresholds = tuple(parse_threshold(t) for t in fail_on)
        results = [_load_result(base), _load_result(new)]
        comparison = compare_results(results[0], results[1], thresholds)
    except BsfinderError as exc:
        _fail(exc, debug)
    if output_format == "json":
        click.echo(json.dumps(comparison.to_dict(), indent=2))
    else:
        _echo(render_comparison(comparison, markdown=output_format == "markdown"))
    if not comparison.ok:
        sys.exit(1)


@main.command()
@click.argument("result_path", metavar="RESULT.json", type=click.Path(dir_okay=False))
@click.option("--html", "html_path", default="", metavar="PATH", help="Write an HTML report.")
@click.option(
    "--plot", "plot_path", default="", metavar="PNG", help="Draw throughput and memory here."
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def report(result_path: str, html_path: str, plot_path: str, debug: bool) -> None:
    """Show a saved probe result; --html writes a page, --plot a picture (matplotlib)."""
    from bsfinder.report import render_summary, render_trials
    from bsfinder.results import write_json_atomic

    _require_writable(debug, ("--html", html_path, True), ("--plot", plot_path, False))
    try:
        result = _load_result(result_path)
        _echo(render_trials(result))
        click.echo()
        _echo(render_summary(result))
        if html_path:
            from bsfinder.report.html import render_html

            try:
                write_json_atomic(html_path, render_html(result))  # atomic text write
            except OSError as exc:
                raise SpecError(f"--html {html_path}: {exc.strerror or exc}") from None
            click.echo(f"wrote {html_path}")
        if plot_path:
            _plot(result, plot_path)
    except BsfinderError as exc:
        _fail(exc, debug)


def _check_output(path: str, option: str, *, makes_folders: bool = False) -> None:
    """Refuse, before any work, an output path this process cannot write (a SpecError).

    ``path`` must not be a directory, and its folder (or, with ``makes_folders``, as
    ``write_json_atomic`` does, its nearest existing ancestor) must be a directory this
    process can create a file in: tried for real, since root passes ``os.access`` on a
    read-only file system. ``''`` and ``'-'`` (no file, stdout) pass.
    """
    import tempfile
    from pathlib import Path

    if not path or path == "-":
        return
    target = Path(path)
    if target.is_dir():
        raise SpecError(f"{option} {path}: is a directory; give a file name")
    folder = target.parent
    while makes_folders and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.exists():
        raise SpecError(f"{option} {path}: no such directory {str(folder)!r}")
    if not folder.is_dir():
        raise SpecError(f"{option} {path}: {str(folder)!r} is not a directory")
    if target.exists() and not os.access(target, os.W_OK):
        raise SpecError(f"{option} {path}: the file is not writable")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise SpecError(
            f"{option} {path}: cannot write in {str(folder)!r} ({exc.strerror or exc})"
        ) from None


#: with ``--json -``: the real stdout, kept for the JSON alone (see :func:`_stdout_for_json`)
_JSON_STDOUT: Any = None


def _stdout_for_json(json_path: str) -> None:
    """With ``--json -`` only the JSON goes to stdout: from here on, whatever this process
    prints (bsfinder's table and summary, a model's or data loader's ``print``) goes to
    stderr, until the command ends."""
    global _JSON_STDOUT
    if json_path != "-":
        return
    _JSON_STDOUT, sys.stdout = sys.stdout, sys.stderr

    def restore(real: Any = _JSON_STDOUT) -> None:
        global _JSON_STDOUT
        if sys.stdout is sys.stderr:
            sys.stdout = real
        _JSON_STDOUT = None

    click.get_current_context().call_on_close(restore)


def _require_writable(debug: bool, *outputs: tuple[str, str, bool]) -> None:
    """Exit 2 with one line unless every ``(option, path, makes_folders)`` output can be
    written (see :func:`_check_output`): called before any work, so none is lost to it."""
    try:
        for option, path, makes_folders in outputs:
            _check_output(path, option, makes_folders=makes_folders)
    except SpecError as exc:
        _fail(exc, debug)


def _load_result(path: str) -> Any:
    """A saved probe result, or a SpecError that says what is wrong with the file."""
    from bsfinder.results import ProbeResult

    try:
        return ProbeResult.load(path)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SpecError(f"{path} is not a bsfinder probe result: {exc}") from None


@main.command("scale-out")
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
    help="Memory per rank, e.g. 80GiB [the probe's capacity].",
)
@click.option("--json", "json_path", default="", metavar="PATH", help="Also write JSON here.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def scale_out(
    result_path: str,
    strategies: tuple[str, ...],
    rank_counts: tuple[int, ...],
    memory: str | None,
    json_path: str,
    debug: bool,
) -> None:
    """Per-rank memory and the largest batch under DDP or FSDP, from a single-device probe.

    RESULT.json is a `bsfinder probe` result from one device. Activations per sample are
    that device's; the weights, gradients and optimizer state are shared out by strategy.
    """
    from dataclasses import asdict

    from bsfinder.report import render_scale_out
    from bsfinder.results import write_json_atomic
    from bsfinder.scaleout import scale_out as estimate_ranks
    from bsfinder.units import parse_bytes

    _require_writable(debug, ("--json", json_path, True))
    try:
        result = _load_result(result_path)
        try:
            capacity = parse_bytes(memory) if memory is not None else None
        except ValueError as exc:
            raise SpecError(f"--memory: {exc}") from None
        estimates = [
            estimate_ranks(result, strategy, ranks, capacity_bytes=capacity)
            for strategy in strategies or ("ddp", "fsdp")
            for ranks in rank_counts or (2, 4, 8)
        ]
    except BsfinderError as exc:
        _fail(exc, debug)
    click.echo(render_scale_out(estimates))
    if json_path:
        data = [{**asdict(e), "global_max_batch": e.global_max_batch} for e in estimates]
        write_json_atomic(json_path, json.dumps(data, indent=2))
        click.echo(f"wrote {json_path}")


def _plot(result: Any, path: str) -> None:
    from bsfinder.report.plot import plot_probe

    plot_probe(result, path)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def devices(as_json: bool) -> None:
    """List the devices bsfinder can probe, with their memory."""
    from bsfinder.devices.listing import list_devices

    found = list_devices()
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for dev in found:
        line = f"{dev['device']:<8} {dev['name']}: total {format_bytes(dev['total_bytes'])}"
        if dev.get("available_bytes") is not None:
            line += f", available {format_bytes(dev['available_bytes'])}"
        if dev.get("nvml_used_bytes") is not None:
            line += f", used {format_bytes(dev['nvml_used_bytes'])} (NVML)"
        if dev.get("uuid"):
            line += f", {dev['uuid']}"
        click.echo(line)
    notes = [d["note"] for d in found if d.get("note")]
    for note in notes:
        click.echo(f"note: {note}")
