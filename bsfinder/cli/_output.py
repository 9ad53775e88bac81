"""What the CLI writes: errors mapped to exit codes, colour, progress; output paths checked."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar, overload

import click

from bsfinder.errors import BsfinderError, SpecError, UserCodeError
from bsfinder.probe import ProbeEvent
from bsfinder.units import format_bytes


def _fail(exc: BsfinderError, debug: bool, prefix: str = "") -> NoReturn:
    if debug:
        if isinstance(exc, UserCodeError) and exc.traceback_text:
            click.echo(exc.traceback_text.rstrip(), err=True)
        else:
            click.echo(traceback.format_exc().rstrip(), err=True)
    click.echo(f"{prefix}error: {exc}", err=True)
    sys.exit(exc.exit_code)


_Command = TypeVar("_Command", bound=Callable[..., Any])


@overload
def errors_to_exit_codes(command: _Command, *, prefix: None = None) -> _Command: ...
@overload
def errors_to_exit_codes(
    command: None = None, *, prefix: Callable[[], str] | None = None
) -> Callable[[_Command], _Command]: ...
def errors_to_exit_codes(command: Any = None, *, prefix: Callable[[], str] | None = None) -> Any:
    """Declare ``--debug`` on a command and map the :class:`~bsfinder.errors.BsfinderError` it
    raises to one line on stderr and the error's exit code (the traceback with ``--debug``).

    The one place errors become exit codes: use it under ``@click.command()``, below the
    command's other options (``--debug`` stays last in its help). ``prefix()``: text before
    ``error:`` (the probe names its rank under torchrun). A command with more to do for an
    error (the probe writes what it measured) catches it, does that, and raises it again.
    """

    def decorate(run: _Command) -> _Command:
        @functools.wraps(run)
        def mapped(*args: Any, debug: bool, **kwargs: Any) -> Any:
            try:
                return run(*args, **kwargs)
            except BsfinderError as exc:
                _fail(exc, debug, prefix() if prefix is not None else "")

        option = click.option("--debug", is_flag=True, help="Show tracebacks.")
        return option(mapped)  # type: ignore[return-value]

    return decorate if command is None else decorate(command)


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


#: off a terminal, a sweep's progress is a line at its first step and every this many after
STEP_LINE_EVERY = 25


def _live(text: str = "") -> None:
    """Rewrite the live progress line on stderr (a terminal): ``text``, or clear it."""
    click.echo("\r" + text if text else "\r\033[K", nl=False, err=True)


class _Progress:
    """Per-trial progress on stderr: a live step counter on a terminal, lines otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
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
            if event.info.budget_source is not None:  # the default the probe settled on
                click.echo(
                    f"  ({event.info.budget_source}; large CPU budgets make long probes: "
                    "--memory-limit sets the budget)",
                    err=True,
                )
        elif event.kind == "trial" and self.live:
            _live(f"  trial {event.index:>2}  batch {event.batch_size:>6}  starting")
        elif event.kind == "step" and self.live:
            _live(
                f"  trial {event.index:>2}  batch {event.batch_size:>6}  "
                f"{_bar(event.step, event.total_steps)} step {event.step}/{event.total_steps}   "
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
        elif event.kind == "lr-range":
            from bsfinder.lr.range_test import LR_START, LR_STEPS

            click.echo(
                f"LR range test at batch {event.batch_size} on your data: up to {LR_STEPS} "
                f"steps from lr {LR_START:g}",
                err=True,
            )
        elif event.kind == "lr-step" and self.live:
            _live(
                f"  LR range test  {_bar(event.step, event.total_steps)} step "
                f"{event.step}/{event.total_steps}   "
            )
        elif event.kind == "lr-step" and (event.step == 1 or event.step % STEP_LINE_EVERY == 0):
            click.echo(f"  LR range test  step {event.step}/{event.total_steps}", err=True)
        elif event.kind == "lr-range-done" and self.live:
            _live()


def _check_output(path: str, option: str, *, makes_folders: bool = False) -> None:
    """Refuse, before any work, an output path this process cannot write (a SpecError).

    ``path`` must not be a directory, and its folder (or, with ``makes_folders``, as
    ``write_text_atomic`` does, its nearest existing ancestor) must be a directory this
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


def _require_writable(*outputs: tuple[str, str, bool]) -> None:
    """A SpecError (exit 2, one line) unless every ``(option, path, makes_folders)`` output can
    be written (see :func:`_check_output`): called before any work, so none is lost to it."""
    for option, path, makes_folders in outputs:
        _check_output(path, option, makes_folders=makes_folders)


def _load_result(path: str) -> Any:
    """A saved probe result, or a SpecError that says what is wrong with the file."""
    from bsfinder.core.results import ProbeResult

    try:
        return ProbeResult.load(path)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SpecError(f"{path} is not a bsfinder probe result: {exc}") from None


def _plot(result: Any, path: str) -> None:
    from bsfinder.report.plot import plot_probe

    plot_probe(result, path)
    click.echo(f"wrote {path}")
