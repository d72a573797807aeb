"""What the commands share: option decorators (--device, --size WxH, --quiet, --workers, --trust-checkpoint, the
data set options), the size parsing, and the one place that turns the library's errors into click's."""
from __future__ import annotations

import contextlib
import functools
import os
import re

import click

from ..data.kinds import COMMAND_LINE_KINDS

# Options that take a size. They read WxH; `--size W H` (two numbers), which evaluate, pseudo-label and infer
# took before, still works: SdcaCommand joins the two into W x H before click parses them.
SIZE_OPTIONS = ("--size", "--static-size", "--calib-size")
_NUMBER = re.compile(r"^\d+$")


class SdcaCommand(click.Command):
    def parse_args(self, ctx, args):
        joined, i = [], 0
        while i < len(args):
            if args[i] in SIZE_OPTIONS and i + 2 < len(args) and _NUMBER.match(args[i + 1]) \
                    and _NUMBER.match(args[i + 2]):
                joined += [args[i], f"{args[i + 1]}x{args[i + 2]}"]
                i += 3
            else:
                joined.append(args[i])
                i += 1
        return super().parse_args(ctx, joined)


class SdcaGroup(click.Group):
    command_class = SdcaCommand


def parse_size(ctx, param, value):
    """Click callback: 'WxH' -> (W, H); None stays None."""
    from sdca_serve.codec import parse_size as parse

    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def size_option(*names, help: str):
    return click.option(*(names or ("--size",)), callback=parse_size, metavar="WxH", help=help)


def device_option(default="auto", help="auto, cpu, cuda or cuda:N."):
    return click.option("--device", default=default, show_default=default is not None, help=help)


def quiet_option(help="No progress bars."):
    return click.option("--quiet", is_flag=True, help=help)


def workers_option(default: int, help: str):
    return click.option("--workers", default=default, show_default=True, help=help)


def trust_option(f):
    """--trust-checkpoint: the one way to read a checkpoint that names Python objects besides tensors."""
    return click.option(
        "--trust-checkpoint", "trust_checkpoint", is_flag=True,
        help="Read the checkpoint (and, for train, model.pretrained) with full unpickling. Off by default: sdca "
             "loads tensors and plain containers only and refuses a file that asks for anything else, because "
             "unpickling such a file can run code. Use it only for a file you know.")(f)


def dataset_options(f):
    """--data KIND --root DIR and what a kind may need besides, with the input size, device and workers."""
    options = [
        click.option("--data", "kind", type=click.Choice(COMMAND_LINE_KINDS), required=True, help="Data set kind."),
        click.option("--root", required=True, type=click.Path(exists=True, file_okay=False),
                     help="Data set root (for 'folder': the image folder)."),
        click.option("--split", default=None, help="Split (cityscapes: train/val; crosscity: train/test)."),
        click.option("--labels", type=click.Path(exists=True, file_okay=False), help="'folder': the label folder."),
        click.option("--mapping", type=click.Path(exists=True, dir_okay=False), help="'folder': the mapping YAML."),
        click.option("--city", help="'crosscity': Rome, Rio, Tokyo or Taipei."),
        click.option("--list-file", type=click.Path(exists=True, dir_okay=False), help="A split list file."),
        size_option(help="Resize inputs to this size before the model (default: native size; `W H` also read)."),
        click.option("--resize", type=click.Choice(["bilinear", "bicubic"]), default="bilinear", show_default=True,
                     help="Image resizing kernel for --size (the public test script resizes with PIL bicubic)."),
        device_option(),
        workers_option(2, "Data loading processes."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


# The errors the library raises for bad input (a missing file, a bad value): shown as one line, no traceback.
INPUT_ERRORS = (FileNotFoundError, ValueError)


def library_errors(*extra):
    """Decorator: the library's input errors (and ``extra`` kinds) become click errors with their message."""
    kinds = INPUT_ERRORS + extra

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            try:
                return f(*args, **kwargs)
            except click.ClickException:
                raise
            except kinds as exc:
                raise click.ClickException(str(exc)) from None
        return wrapper
    return decorate


@contextlib.contextmanager
def bad_parameter(hint: str):
    """Input errors inside become click.BadParameter naming ``hint`` (an option or argument)."""
    try:
        yield
    except INPUT_ERRORS as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def existing_file(path: str, hint: str) -> str:
    if not os.path.isfile(path):
        raise click.BadParameter(f"{path} does not exist", param_hint=hint)
    return path


def command(*args, **kwargs):
    """click.command for sdca's commands: SdcaCommand, which reads the old `--size W H` form."""
    kwargs.setdefault("cls", SdcaCommand)
    return click.command(*args, **kwargs)
