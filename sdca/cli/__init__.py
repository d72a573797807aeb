"""The `sdca` command line: one module per command group, each command parses, calls one library function and
prints. Shared options and error handling: options.py."""
from __future__ import annotations

import click

from .._version import __version__
from .options import SdcaGroup


@click.group(cls=SdcaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="sdca")
def main():
    """Domain-adaptive semantic segmentation with SDCA.

    Adapt a DeepLab-v2 segmenter from labelled synthetic frames to unlabelled
    real frames, evaluate it, export it to ONNX and run it on folders of frames.
    """


# Registration order is the order of `sdca --help`'s listing (click sorts it by name anyway).
from . import deployment, evaluation, info, training  # noqa: E402

for _module in (info, training, evaluation, deployment):
    for _command in _module.COMMANDS:
        main.add_command(_command)

# Old import paths (tests and scripts outside the repository use them).
from ..engine.stages import STAGE_NAMES  # noqa: E402, F401
from .evaluation import INSPECT_SOURCE_KINDS  # noqa: E402, F401
from .options import COMMAND_LINE_KINDS as DATA_KINDS  # noqa: E402, F401
from .options import bad_parameter  # noqa: E402
from .options import parse_size as _parse_size  # noqa: E402, F401
from .options import trust_option as _trust_option  # noqa: E402, F401


def _frames_of(source: str, hint: str = "--calibrate"):
    """The old helper: CONFIG:ENTRY as that data set's image paths, anything else as given."""
    from ..engine.data_specs import frames_or_spec

    with bad_parameter(hint):
        return frames_or_spec(source)


if __name__ == "__main__":
    main()
