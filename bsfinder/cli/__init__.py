"""The command line: the only package that prints or imports click. One module per command;
errors map to exit codes in one place
(:func:`bsfinder.cli._output.errors_to_exit_codes`, which also declares ``--debug``)."""

from __future__ import annotations

import click

from bsfinder.cli._signals import _Main


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bsfinder")
def main() -> None:
    """Which batch size, and which learning rate: measured on real training steps."""


def _register() -> None:
    from bsfinder.cli import compare, devices, estimate, lr, probe, profile, report, scaleout

    for module, name in (
        (probe, "probe"), (profile, "profile"), (estimate, "estimate"), (compare, "compare"),
        (report, "report"), (scaleout, "scale_out"), (devices, "devices"), (lr, "lr"),
    ):  # fmt: skip
        main.add_command(getattr(module, name))


_register()

__all__ = ["main"]
