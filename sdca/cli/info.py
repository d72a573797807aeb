"""`sdca doctor`."""
from __future__ import annotations

import json

import click

from .options import command


@command(short_help="Versions, torch device, kernel backends and ONNX Runtime providers.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json: bool):
    """Report versions, the torch device, which SDCA kernel backends are built, and ONNX Runtime providers."""
    from ..doctor import collect, format_report

    info = collect()
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info))


COMMANDS = (doctor,)
