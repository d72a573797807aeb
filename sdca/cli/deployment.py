"""`sdca export`, `sdca infer`, `sdca adapt-bn`, `sdca serve`, `sdca ros`: from a checkpoint to a deployed model."""
from __future__ import annotations

import os
import sys

import click

from .options import (
    bad_parameter,
    command,
    device_option,
    existing_file,
    library_errors,
    quiet_option,
    size_option,
    trust_option,
    workers_option,
)


def _describe(ctx, param, value):
    """--describe MODEL.onnx: print what NAME.yaml holds and exit, before anything else is looked at."""
    if value is None or ctx.resilient_parsing:
        return
    from ..deploy.sidecar import describe_text

    try:
        click.echo(describe_text(value), nl=False)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    ctx.exit()


def _export_checkpoint(checkpoint_arg, onnx_checkpoint):
    """CHECKPOINT, or the older `--onnx CHECKPOINT` spelling, or the newest final checkpoint under runs/."""
    from ..deploy.run_folders import newest

    if onnx_checkpoint and checkpoint_arg:
        raise click.UsageError("give the checkpoint once: `sdca export --onnx CKPT` or `sdca export CKPT`")
    checkpoint = onnx_checkpoint or checkpoint_arg
    if not checkpoint:
        checkpoint = newest("final.pt")
        if checkpoint is None:
            raise click.ClickException("no checkpoint given and no final checkpoint under runs/: pass one, or make "
                                       "one with `sdca demo` or `sdca train`")
        click.echo(f"sdca: exporting the newest final checkpoint, {checkpoint}", err=True)
    return existing_file(checkpoint, "CHECKPOINT")


@command(short_help="Export a checkpoint to ONNX (and side files, a Triton repository).")
@click.argument("checkpoint_arg", metavar="[CHECKPOINT]", required=False, type=click.Path(dir_okay=False))
@click.option("--onnx", "onnx_checkpoint", is_flag=False, flag_value="", default=None, metavar="[CHECKPOINT]",
              help="Export to ONNX (the only format; kept so that `sdca export --onnx CKPT -o M` reads as before).")
@click.option("-o", "--out", type=click.Path(dir_okay=False),
              help="The .onnx file to write (default: model.onnx beside the checkpoint).")
@click.option("--output", type=click.Choice(["logits", "probs", "labels"]), default="logits", show_default=True,
              help="Graph output: logits, softmax probabilities, or an in-graph argmax as uint8 labels.")
@click.option("--fp16", is_flag=True, help="Store weights in float16 (inputs and outputs stay float32).")
@click.option("--opset", default=18, show_default=True, help="ONNX opset (18 suits onnxruntime >= 1.17 and TensorRT 10).")
@size_option("--static-size", help="Fix every shape (batch 1, this size) for runtimes without dynamic shapes: OpenCV's "
                                   "DNN module and the C++ consumer in export/.")
@click.option("--relu6", type=click.Choice(["clip", "relu-difference"]), default=None,
              help="EfficientNet-Lite0's ReLU6 in the graph: clip (one Clip node; fastest in ONNX Runtime, OpenVINO, "
                   "TensorRT, Triton, and quantized over [0, 6]) or relu-difference (relu(x) - relu(x - 6), for "
                   "OpenCV's DNN module). Default: relu-difference with --static-size (the OpenCV consumer's "
                   "export), clip otherwise. --describe shows which.")
@click.option("--triton", "triton_repo", type=click.Path(file_okay=False),
              help="Also write a Triton Inference Server model repository here (REPO/NAME/config.pbtxt, "
                   "REPO/NAME/1/model.onnx) with dynamic batching.")
@click.option("--triton-name", default="sdca", show_default=True, help="The model's name in the Triton repository.")
@click.option("--max-batch", default=8, show_default=True, help="Triton max_batch_size.")
@click.option("--no-check", is_flag=True, help="Skip onnx.checker and the onnxruntime-vs-PyTorch parity run.")
@click.option("--no-sidecar", is_flag=True,
              help="Do not write NAME.labels.txt, NAME.palette.csv and NAME.yaml beside the model.")
@click.option("--describe", type=click.Path(exists=True, dir_okay=False), metavar="MODEL.onnx", expose_value=False,
              is_eager=True, callback=_describe,
              help="Print the conventions of an exported model (what NAME.yaml holds) and exit.")
@click.option("--int8", is_flag=True, help="Quantize to INT8 (ONNX Runtime static quantization, QDQ, per-channel "
                                           "weights) with an accuracy gate against the float model.")
@click.option("--calibrate", metavar="DIR|GLOB|CONFIG:ENTRY",
              help="--int8: calibration frames: a folder, a glob pattern, or a config's data set entry such as "
                   "gta5_cityscapes_r101:target or my.yaml:val (its images).")
@click.option("--calib-frames", default=200, show_default=True, help="--int8: frames used for calibration.")
@click.option("--calib-method", type=click.Choice(["entropy", "minmax", "percentile"]), default="entropy",
              show_default=True, help="--int8: how activation ranges are chosen from the calibration frames.")
@click.option("--holdout-frames", default=20, show_default=True,
              help="--int8: further frames (never calibration ones) on which INT8 is compared with float.")
@click.option("--holdout", metavar="DIR|GLOB",
              help="--int8: take the held-out frames from here instead of from --calibrate.")
@size_option("--calib-size", help="--int8: the size frames are brought to (default: the model's fixed or training "
                                  "size).")
@click.option("--min-agreement", default=0.98, show_default=True,
              help="--int8: the least share of held-out pixels whose label INT8 and float agree on.")
@click.option("--force", is_flag=True, help="--int8: write the model even below --min-agreement.")
@click.option("--activations", type=click.Choice(["auto", "uint8", "int8"]), default="auto", show_default=True,
              help="--int8: activation type. auto: uint8 on x86-64 (the only kind ONNX Runtime runs as integer "
                   "convolutions there), int8 elsewhere (ARM); recorded in the metadata.")
@trust_option
@library_errors(FileExistsError, RuntimeError)
def export(checkpoint_arg, onnx_checkpoint, out, output, fp16, opset, static_size, relu6, triton_repo, triton_name,
           max_batch, no_check, no_sidecar, int8, calibrate, calib_frames, calib_method, holdout_frames, holdout,
           calib_size, min_agreement, force, activations, trust_checkpoint):
    """Export a checkpoint to ONNX: dynamic batch, height and width (or one fixed size with --static-size),
    upsampling to the input size in the graph, class names, palette and input normalisation in the metadata;
    then a parity check against PyTorch. With --triton, also a Triton model repository.

    Without CHECKPOINT, the newest final checkpoint under runs/. Beside the model go the side files robotics
    stacks read (NAME.labels.txt, NAME.palette.csv, NAME.yaml; --no-sidecar to skip).

    Deploying to a camera unlike the training frames? Run `sdca adapt-bn CHECKPOINT FRAMES... -o ADAPTED.pt`
    first and export ADAPTED.pt: batch-norm statistics of that camera, from unlabelled frames.
    """
    from ..deploy.exporter import Int8Options, export_model

    checkpoint = _export_checkpoint(checkpoint_arg, onnx_checkpoint)
    if static_size is not None and triton_repo is not None:
        raise click.UsageError("--triton needs the dynamic-batch export: drop --static-size")
    if int8 and fp16:
        raise click.UsageError("--int8 and --fp16 exclude each other: INT8 quantizes the float32 export")
    if int8 and not calibrate:
        raise click.UsageError("--int8 needs --calibrate DIR|GLOB: frames like those the model will see")
    if out is None and triton_repo is None:
        out = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "model.onnx")
    quant_options = None
    if int8:
        from ..engine.data_specs import frame_paths

        with bad_parameter("--calibrate"):
            frames = frame_paths(calibrate, "calibration frames")
        quant_options = Int8Options(frames, calib_frames=calib_frames, held_out_frames=holdout_frames,
                                    method=calib_method, size=calib_size, min_agreement=min_agreement, force=force,
                                    held_out=holdout, activations=activations)
    result = export_model(checkpoint, out, output=output, fp16=fp16, opset=opset, static_size=static_size,
                          relu6=relu6, check=not no_check, trusted=trust_checkpoint, int8=quant_options,
                          triton_repo=triton_repo, triton_name=triton_name, max_batch=max_batch,
                          sidecars=not no_sidecar)
    report, quant = result["report"], result["quant"]
    if out:
        shape = f", fixed input {static_size[0]}x{static_size[1]}" if static_size else ""
        click.echo(f"sdca: wrote {out} ({report['bytes'] / 2**20:.1f} MiB, output {output}, opset {opset}"
                   f"{', fp16 weights' if fp16 else ''}{', int8' if int8 else ''}{shape})")
    if quant:
        click.echo(f"  int8 vs float on {quant['held_out_frames']} held-out frames: label agreement "
                   f"{100 * quant['label_agreement']:.2f}%, mIoU {100 * quant['miou_vs_float']:.1f} "
                   f"({quant['calibration_frames']} calibration frames, {quant['method']}; {quant['activations']} "
                   f"activations: {quant['integer_convs']} of {quant['convs']} convolutions run as integer kernels)"
                   + (" -- below --min-agreement, written because of --force" if quant["forced"] else ""))
    if result["sidecars"]:
        click.echo(f"sdca: side files {', '.join(os.path.basename(p) for p in result['sidecars'].values())}")
    for p in report.get("parity", []):
        diff = "n/a" if p["max_abs_diff"] is None else f"{p['max_abs_diff']:.3g}"
        click.echo(f"  parity {'x'.join(map(str, p['shape']))}: max |diff| {diff}, "
                   f"label agreement {100 * p['label_agreement']:.3f}%")
    if result["triton"] is not None:
        click.echo(f"sdca: wrote Triton model {result['triton']} (config.pbtxt, 1/model.onnx; max_batch_size "
                   f"{max_batch})")


def _default_model():
    """$SDCA_MODEL, else the newest .onnx under runs/."""
    from ..deploy.run_folders import newest

    model = os.environ.get("SDCA_MODEL") or newest("*.onnx")
    if model is None:
        raise click.ClickException("no model: pass --model MODEL.onnx (or a checkpoint), set SDCA_MODEL, or make "
                                   "one with `sdca demo` (it exports runs/demo/model.onnx) or `sdca export`")
    return existing_file(model, "SDCA_MODEL")


@command(short_help="Segment files, folders, globs or videos with an exported model or a checkpoint.")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", type=click.Path(exists=True, dir_okay=False),
              help="An exported .onnx file (ONNX Runtime) or a checkpoint (PyTorch). Default: $SDCA_MODEL, else "
                   "the newest .onnx under runs/.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Output folder (mirrors the inputs). Default: a new runs/infer/NAME folder.")
@click.option("--backend", "--runtime", "backend", type=click.Choice(["onnxruntime", "openvino", "pytorch"]),
              help="Override the backend the file implies: openvino runs an .onnx export on OpenVINO's CPU plugin "
                   "(pip install 'sdca[openvino]').")
@click.option("--precision", type=click.Choice(["f32", "bf16"]), default="f32", show_default=True,
              help="--backend openvino: inference precision (bf16 where the CPU reports it; an INT8 export runs as "
                   "INT8 either way).")
@device_option()
@click.option("--providers", help="ONNX Runtime providers in priority order, e.g. tensorrt,cuda,cpu.")
@click.option("--batch", default=4, show_default=True, help="Frames per model call (frames of one size).")
@size_option(help="Resize frames for the model (outputs keep the frame size; `W H` also read).")
@workers_option(4, "Decoding and encoding threads.")
@click.option("--color", is_flag=True, help="Colour label maps (the default when no output is chosen).")
@click.option("--overlay", is_flag=True, help="Colours alpha-blended on the frame (JPEG).")
@click.option("--trainid", is_flag=True, help="trainId PNGs (class indices, 255 = none).")
@click.option("--labelid", is_flag=True, help="Cityscapes labelId PNGs, for the official evaluation server.")
@click.option("--confidence", is_flag=True, help="Max softmax probability per pixel, as 8-bit PNGs (x255).")
@click.option("--opacity", default=0.5, show_default=True, help="Overlay opacity.")
@click.option("--video-stride", default=1, show_default=True, help="Segment every n-th video frame.")
@click.option("--skip-existing", is_flag=True, help="Skip frames whose outputs all exist (resume a run).")
@quiet_option("No progress bar.")
@trust_option
@library_errors()
def infer(inputs, model, out, backend, device, providers, batch, size, workers, color, overlay, trainid, labelid,
          confidence, opacity, video_stride, skip_existing, quiet, trust_checkpoint, precision):
    """Segment INPUTS (files, folders searched recursively, glob patterns, videos) into OUT.

    Outputs go to OUT/<kind>/<input path>.png, one folder per requested kind; OUT/summary.json lists frames,
    failures, wall time and frames/s. Unreadable inputs are reported and skipped (exit status 2).
    """
    from ..deploy.infer import run_inference
    from ..deploy.run_folders import new_folder, run_name
    from ..deploy.runtime import open_segmenter

    model = model or _default_model()
    out = out or new_folder(os.path.join("runs", "infer"), run_name(inputs))
    click.echo(f"sdca: model {model}; outputs in {out}", err=True)
    kinds = [k for k, on in (("color", color), ("overlay", overlay), ("trainid", trainid), ("labelid", labelid),
                             ("confidence", confidence)) if on] or ["color"]
    segmenter = open_segmenter(model, backend, providers=providers.split(",") if providers else None,
                               device=device, trusted=trust_checkpoint, precision=precision)
    click.echo(f"sdca: {segmenter.backend} on {', '.join(segmenter.providers)}", err=True)
    summary = run_inference(segmenter, inputs, out, outputs=kinds, batch=batch, size=size, workers=workers,
                            skip_existing=skip_existing, progress=not quiet, opacity=opacity,
                            video_stride=video_stride)
    click.echo(f"sdca: {summary['frames']} frames in {summary['wall_time_s']} s ({summary['frames_per_s']} frames/s)"
               f", {summary['skipped_existing']} skipped, {len(summary['failures'])} failed; see {out}/summary.json")
    for failure in summary["failures"][:10]:
        click.echo(f"  failed: {failure['file']}: {failure['reason']}", err=True)
    if summary["failures"]:
        sys.exit(2)


@command("adapt-bn", short_help="Re-estimate batch-norm statistics on unlabelled target frames (AdaBN).")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("targets", nargs=-1, required=True, metavar="TARGET...")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), metavar="ADAPTED.pt",
              help="Where the adapted checkpoint goes (written atomically).")
@click.option("--frames", "max_frames", default=500, show_default=True, type=click.IntRange(1),
              help="At most this many frames (a fixed random subset when there are more).")
@size_option(help="The size frames are brought to (default: the model's training size).")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(2),
              help="Frames per batch (statistics are averaged over batches).")
@device_option()
@quiet_option("No progress bar.")
@trust_option
@library_errors()
def adapt_bn(checkpoint, targets, out, max_frames, size, batch_size, device, quiet, trust_checkpoint):
    """AdaBN: CHECKPOINT with every batch norm's running mean and variance re-estimated on TARGET frames (folders,
    glob patterns, image files, or a config's data set entry such as my.yaml:target), written to ADAPTED.pt.

    No labels, no source data, no training: one pass over frames from the camera the model will run on. Use it
    after training on a simulator and before `sdca export`, whenever the deployment camera differs from the
    training frames; on SynthDrive it gave most of adaptation's measured gain (docs/results.md). Models trained
    with frozen batch norm keep that mode; a model without batch norm (VGG-16) is refused.
    """
    from ..device import resolve_device
    from ..engine.adapt_bn import adapt_batchnorm
    from ..engine.data_specs import frame_paths_of

    existing_file(checkpoint, "CHECKPOINT")
    with bad_parameter("TARGET"):
        frames = frame_paths_of(targets, "target frames")
    summary = adapt_batchnorm(checkpoint, frames, out, max_frames=max_frames, size=size, batch_size=batch_size,
                              device=str(resolve_device(device)), progress=not quiet, trusted=trust_checkpoint)
    click.echo(f"sdca: re-estimated {summary['layers']} batch-norm layers on {summary['frames']} frames "
               f"({summary['batches']} batches) -> {out}")


# serve and ros hand their arguments to the torch-free sdca_serve entry points unparsed.
PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


@command(cls=click.Command, short_help="Serve an exported .onnx model over HTTP (sdca serve MODEL --help).",
               context_settings=PASS_THROUGH, add_help_option=False)
@click.pass_context
def serve(ctx):
    """Serve an exported .onnx model over HTTP (ONNX Runtime; `sdca serve MODEL.onnx --help` for options).

    The service is the sdca_serve package, which needs no torch: `python -m sdca_serve MODEL.onnx` runs the same.
    """
    from sdca_serve.__main__ import main as serve_main

    ctx.exit(serve_main(list(ctx.args), prog="sdca serve"))


@command(cls=click.Command, short_help="Run an exported .onnx model as a ROS 2 node (sdca ros MODEL --help).",
               context_settings=PASS_THROUGH, add_help_option=False)
@click.pass_context
def ros(ctx):
    """Run an exported .onnx model as a ROS 2 segmentation node: sensor_msgs/Image in, mono8 class ids and an rgb8
    colour mask out (`sdca ros MODEL.onnx --help`; `sdca export` writes NAME.ros2.yaml for --ros-args
    --params-file). The node is sdca_serve.ros, which needs no torch: `python -m sdca_serve.ros` runs the same."""
    from sdca_serve.ros import main as ros_main

    ctx.exit(ros_main(list(ctx.args), prog="sdca ros"))


COMMANDS = (export, infer, adapt_bn, serve, ros)
