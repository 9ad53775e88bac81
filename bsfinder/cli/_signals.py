"""Ctrl-C and SIGTERM: stop like an interrupt, keep what was measured, exit 130/143."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Any

import click


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
