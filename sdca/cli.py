"""The `sdca` command line: thin wrappers that parse, call one library function and print."""
from __future__ import annotations

import json

import click

from ._version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="sdca")
def main():
    """Domain-adaptive semantic segmentation with SDCA.

    Adapt a DeepLab-v2 segmenter from labelled synthetic frames to unlabelled
    real frames, evaluate it, export it to ONNX and run it on folders of frames.
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json: bool):
    """Report versions, the torch device, which SDCA kernel backends are built, and ONNX Runtime providers."""
    from .doctor import collect, format_report

    info = collect()
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info))


if __name__ == "__main__":
    main()
