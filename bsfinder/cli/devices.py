"""``bsfinder devices``: what this machine can probe on."""

from __future__ import annotations

import json

import click

from bsfinder.units import format_bytes


@click.command()
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
