"""The `sdca` command line: thin wrappers that parse, call one library function and print."""
from __future__ import annotations

import json
import os
import sys

import click

from ._version import __version__

STAGE_NAMES = ("source", "init-stats", "adapt", "pseudo-label", "self-train", "adapt-bn", "mean-teacher")
DATA_KINDS = ("gta5", "synthia", "cityscapes", "crosscity", "folder", "images")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="sdca")
def main():
    """Domain-adaptive semantic segmentation with SDCA.

    Adapt a DeepLab-v2 segmenter from labelled synthetic frames to unlabelled
    real frames, evaluate it, export it to ONNX and run it on folders of frames.
    """


@main.command(short_help="Versions, torch device, kernel backends and ONNX Runtime providers.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json: bool):
    """Report versions, the torch device, which SDCA kernel backends are built, and ONNX Runtime providers."""
    from .doctor import collect, format_report

    info = collect()
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info))


def _trust_option(f):
    """--trust-checkpoint: the one way to read a checkpoint that names Python objects besides tensors."""
    return click.option(
        "--trust-checkpoint", "trust_checkpoint", is_flag=True,
        help="Read the checkpoint (and, for train, model.pretrained) with full unpickling. Off by default: sdca "
             "loads tensors and plain containers only and refuses a file that asks for anything else, because "
             "unpickling such a file can run code. Use it only for a file you know.")(f)


def _config(config, overrides, **direct):
    from .engine import ConfigError, load_config

    try:
        return load_config(config, list(overrides), **direct)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--set / CONFIG") from None


@main.command(short_help="Train: source, init-stats, adapt, pseudo-label, self-train.")
@click.argument("config", required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set solver.adapt.iters=1000 (repeatable).")
@click.option("--stage", "stages", multiple=True, type=click.Choice(STAGE_NAMES),
              help="Run only these stages (repeatable); default: the config's stages (the five of the paper, in "
                   "order, unless it lists others). adapt-bn (never by default) re-estimates the last stage's batch "
                   "norm on the target frames (AdaBN); mean-teacher is the one-stage adaptation after source "
                   "(SDCA's successor, SePiCo: EMA teacher, ClassMix, optional SDCA loss), instead of the four "
                   "stages after source.")
@click.option("--name", help="Run name: outputs go to OUTPUT_DIR/NAME (default: the config's name).")
@click.option("--output-dir", help="Folder that holds the runs (default: runs).")
@click.option("--init", "init_checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="Checkpoint the first stage starts from (ours or a public SDCA release file).")
@click.option("--no-pretrained", is_flag=True, help="Train the source stage from scratch, without ImageNet weights.")
@click.option("--amp", type=click.Choice(["fp16", "bf16"]), help="Mixed precision (fp16 on CUDA, bf16 on CUDA or CPU).")
@click.option("--device", help="auto (default), cpu, cuda or cuda:N.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--print-recipe", is_flag=True,
              help="Print the resolved per-stage recipe (lr, schedule, batch per process and global, batch norm, "
                   "input, augmentation, sampling) and exit without training.")
@click.option("--world-size", type=int, default=None, metavar="N",
              help="With --print-recipe: the number of processes the global batches are given for "
                   "(default: WORLD_SIZE, else 1).")
@_trust_option
def train(config, overrides, stages, name, output_dir, init_checkpoint, no_pretrained, amp, device, quiet,
          print_recipe, world_size, trust_checkpoint):
    """Run the SDCA pipeline: source -> init-stats -> adapt -> pseudo-label -> self-train.

    CONFIG is a YAML file or a packaged preset (gta5_cityscapes_r101, gta5_cityscapes_vgg16,
    synthia_cityscapes_r101, synthia_cityscapes_vgg16, cityscapes_crosscity_r101, default). Every stage
    resumes from its last checkpoint if interrupted, and a finished stage is skipped, so rerunning the same
    command continues a run. Under torchrun (`torchrun --nproc-per-node N -m sdca train ...`) each process
    takes its share of every batch.
    """
    from .engine import Interrupted, Runner

    direct = {}
    if name:
        direct["name"] = name
    if output_dir:
        direct["output_dir"] = output_dir
    if amp:
        direct["amp"] = amp
    if device:
        direct["device"] = device
    if no_pretrained:
        direct["model"] = {"no_pretrained": True}
    if stages:
        direct["stages"] = list(stages)
    cfg = _config(config or "default", overrides, **direct)
    if print_recipe:
        from .engine import ConfigError
        from .engine.recipe import format_recipe

        if world_size is not None and world_size < 1:
            raise click.BadParameter("must be at least 1", param_hint="--world-size")
        try:
            click.echo(format_recipe(cfg, world_size or int(os.environ.get("WORLD_SIZE", "1"))))
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--set / CONFIG") from None
        return
    _check_data(cfg, config or "default")
    from .engine.distributed import shutdown

    runner = None
    try:
        runner = Runner(cfg, progress=not quiet, init_checkpoint=init_checkpoint, trust_checkpoint=trust_checkpoint)
        result = runner.train()
    except Interrupted as exc:
        click.echo(f"sdca: {exc}", err=True)
        sys.exit(130 if exc.signal_name == "SIGINT" else 143)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if runner is not None:
            shutdown(runner.dist)
    if runner.dist.is_main:
        click.echo(f"sdca: run {cfg.name} finished stages {', '.join(result['stages'])} in {result['seconds']} s; "
                   f"outputs in {result['run_dir']}")


def _check_data(cfg, config_name: str) -> None:
    """Before any model is built: the configured data folders exist, or one message that says what to do."""
    from .engine.config import presets

    needs = {"source": ("source", "init-stats", "adapt", "mean-teacher"),
             "target": ("adapt", "pseudo-label", "self-train", "mean-teacher"),
             "val": tuple(cfg.stages)}
    missing = []
    for which in ("source", "target", "val"):
        ds = getattr(cfg.data, which)
        if not set(needs[which]) & set(cfg.stages):
            continue
        if ds is None or ds.kind == "synthdrive":
            continue
        for key in ("root", "labels", "mapping"):
            path = getattr(ds, key, None)
            if key == "root" or path:
                if not path or not os.path.exists(path):
                    missing.append(f"data.{which}.{key} = {path or '(empty)'}")
    if not missing:
        return
    raise click.ClickException(
        f"{config_name}: no data where the config points:\n  " + "\n  ".join(missing) + "\n"
        "Point it at your data, e.g.\n"
        f"  sdca train {config_name} --set data.source.root=SIM/images --set data.source.labels=SIM/labels \\\n"
        "      --set data.source.mapping=SIM/mapping.yaml --set data.target.root=REAL/frames\n"
        "or write a YAML file of your own (README, 'Training' and 'Data'). Presets: " + ", ".join(presets()) + ".\n"
        "To see the whole pipeline run first, on data it generates itself: sdca demo")


def _dataset_options(f):
    options = [
        click.option("--data", "kind", type=click.Choice(DATA_KINDS), required=True, help="Data set kind."),
        click.option("--root", required=True, type=click.Path(exists=True, file_okay=False),
                     help="Data set root (for 'folder': the image folder)."),
        click.option("--split", default=None, help="Split (cityscapes: train/val; crosscity: train/test)."),
        click.option("--labels", type=click.Path(exists=True, file_okay=False), help="'folder': the label folder."),
        click.option("--mapping", type=click.Path(exists=True, dir_okay=False), help="'folder': the mapping YAML."),
        click.option("--city", help="'crosscity': Rome, Rio, Tokyo or Taipei."),
        click.option("--list-file", type=click.Path(exists=True, dir_okay=False), help="A split list file."),
        click.option("--size", nargs=2, type=int, metavar="W H",
                     help="Resize inputs to this size before the model (default: native size)."),
        click.option("--resize", type=click.Choice(["bilinear", "bicubic"]), default="bilinear", show_default=True,
                     help="Image resizing kernel for --size (the public test script resizes with PIL bicubic)."),
        click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N."),
        click.option("--workers", default=2, show_default=True, help="Data loading processes."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _build(kind, root, split, labels, mapping, city, list_file, num_classes, labelled=True, size=None):
    from .data import build_transform
    from .engine.builders import build_dataset
    from .engine.config import DatasetConfig

    default_split = {"cityscapes": "val", "crosscity": "test"}.get(kind, "train")
    ds = DatasetConfig(kind=kind, root=root, split=split or default_split, labels=labels, mapping=mapping,
                       city=city, list_file=list_file, labelled=labelled)
    try:
        return build_dataset(ds, num_classes, build_transform(size=size))
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def _load(checkpoint, device, trusted=False):
    from .device import resolve_device
    from .models import load_model

    try:
        dev = resolve_device(device)
        return load_model(checkpoint, device=dev, trusted=trusted), dev
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command(short_help="Score a checkpoint on a labelled split (per-class IoU, mIoU).")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@_dataset_options
@click.option("--flip", is_flag=True, help="Average with the horizontally flipped prediction.")
@click.option("--scales", multiple=True, type=float, help="Multi-scale test: scales of --size (repeatable).")
@click.option("--pdd", is_flag=True, help="Also report the PDD of Eq. 25 per class (needs statistics in the checkpoint).")
@click.option("--save-predictions", type=click.Path(file_okay=False), help="Write each prediction as a PNG here.")
@click.option("--labelid", is_flag=True, help="Write Cityscapes labelIds (for the official evaluation scripts).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results as JSON.")
@_trust_option
def evaluate(checkpoint, kind, root, split, labels, mapping, city, list_file, size, resize, device, workers, flip,
             scales, pdd, save_predictions, labelid, json_out, trust_checkpoint):
    """Score CHECKPOINT on a labelled split: per-class IoU, mIoU (and the 13-class mIoU* for 16-class models,
    tail-class mIoU for 19-class ones). Predictions are resized to each label's resolution."""
    from ._atomic import atomic_write_text
    from .engine import evaluate as run_evaluate
    from .engine import format_table
    from .engine.evaluator import standard_subsets
    from .method import SemanticDistribution
    from .models import read_checkpoint

    model, dev = _load(checkpoint, device, trust_checkpoint)
    dataset = _build(kind, root, split, labels, mapping, city, list_file, model.num_classes)
    stats = None
    if pdd:
        raw = read_checkpoint(checkpoint, trusted=trust_checkpoint)
        state = (raw.get("statistics") or {}).get("features") if isinstance(raw, dict) else None
        if not state:
            raise click.ClickException(f"{checkpoint} holds no feature statistics, which --pdd needs "
                                       "(use a checkpoint from init-stats or adapt)")
        stats = SemanticDistribution.from_state_dict(state)
    subsets = standard_subsets(model.num_classes)
    summary = run_evaluate(model, dataset, device=dev, size=size, scales=scales or (1.0,), flip=flip,
                           save_dir=save_predictions, labelid_png=labelid, pdd_stats=stats, subsets=subsets,
                           workers=workers, resize=resize)
    click.echo(format_table(summary))
    if summary.get("unreadable"):
        click.echo(f"sdca: {len(summary['unreadable'])} unreadable image(s) left out, e.g. {summary['unreadable'][0]}",
                   err=True)
    if json_out:
        atomic_write_text(json_out, json.dumps(summary, indent=2))


@main.command("pseudo-label", short_help="Write Eq. 19 pseudo-labels for a folder or data set of target frames.")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@_dataset_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the label maps.")
@click.option("--cap", default=0.9, show_default=True, help="Cap on the class thresholds (the public code's 0.9).")
@_trust_option
def pseudo_label(checkpoint, kind, root, split, labels, mapping, city, list_file, size, resize, device, workers, out,
                 cap, trust_checkpoint):
    """Write Eq. 19 pseudo-labels for every target image: per-class median confidence thresholds over the whole
    set (exact, streamed), label PNGs (255 below threshold) and thresholds.json with each class's share."""
    from .engine import generate_pseudo_labels

    model, dev = _load(checkpoint, device, trust_checkpoint)
    dataset = _build(kind, root, split or "train", labels, mapping, city, list_file, model.num_classes,
                     labelled=False)
    report = generate_pseudo_labels(model, dataset, out, device=dev, size=size, cap=cap, workers=workers,
                                    resize=resize)
    click.echo(f"sdca: {report['images']} label maps in {out}; {100 * report['ignored_share']:.1f}% of pixels "
               "left unlabelled; thresholds in thresholds.json")
    if report["unreadable"]:
        click.echo(f"sdca: {len(report['unreadable'])} unreadable frame(s) skipped, no label written, e.g. "
                   f"{report['unreadable'][0]}", err=True)


@main.command(short_help="The whole pipeline on the embedded SynthDrive data, with a report.")
@click.option("--quick", is_flag=True, help="A small, fast run (about 2 minutes on 2 cores) that still runs every stage.")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run folder; the SynthDrive frames are cached beside it.")
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(quick, out, seed, quiet):
    """The whole pipeline on the embedded SynthDrive data, on the CPU: source-only, init-stats, adapt,
    pseudo-label and self-train with the small model, each stage evaluated on held-out 'real' frames, the final
    model exported to ONNX and run on a few frames; writes OUT/report.md."""
    from .engine.demo import run_demo

    if os.path.isdir(out) and os.path.isfile(os.path.join(out, "config.yaml")):
        click.echo(f"sdca: {out} exists: finished stages are reused (delete the folder for a fresh run)", err=True)
    path = run_demo(out, quick=quick, seed=seed, progress=not quiet)
    click.echo(f"sdca: demo finished; report: {path}")


@main.command(short_help="The controlled SynthDrive experiment (seeds, controls, validation sweep).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Experiment folder (one sub-folder per run, results/, report.md); SynthDrive is cached beside "
                   "it. [default: runs/experiment, runs/experiment-lite0 for --model lite0]")
@click.option("--model", "model", type=click.Choice(["small", "lite0"]), default="small", show_default=True,
              help="small: the width-16 network from scratch at 256x128; lite0: EfficientNet-Lite0 from ImageNet "
                   "at 384x192, output stride 16 (about 1.5 hours on 2 cores with --jobs 2).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Runs at a time (each gets cores / jobs threads).")
@click.option("--quick", is_flag=True, help="Tiny frame counts and iterations: checks the plumbing, measures nothing.")
@click.option("--mean-teacher-only", is_flag=True,
              help="Only the controls and the four mean-teacher rows, at the recipe's defaults (no sweep, no SDCA "
                   "rows): about 1.5 hours on 2 cores with --jobs 2 for the small model.")
def experiment(out, model, seeds, jobs, quick, mean_teacher_only):
    """The controlled SynthDrive experiment the README reports: source-only, oracle, AdaBN, self-training,
    the lambda = 0 control, SDCA (paper and public-code losses), SDCA + self-training, and the one-stage mean
    teacher (without contrast, with SDCA's loss on a projection head or on the backbone, without ClassMix), over
    several seeds, with every setting chosen on a validation split. Resumes where it stopped; writes
    OUT/report.md."""
    from .engine.experiment import run_experiment

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integers, got {seeds!r}", param_hint="--seeds") from None
    if not seed_list or 0 not in seed_list:
        raise click.BadParameter("must include seed 0 (the validation sweep runs on it)", param_hint="--seeds")
    out = out or ("runs/experiment" if model == "small" else f"runs/experiment-{model}")
    path = run_experiment(out, seeds=seed_list, jobs=jobs, quick=quick, model=model,
                          log=lambda m: click.echo(f"sdca: {m}"), mean_teacher_only=mean_teacher_only)
    click.echo(f"sdca: experiment report: {path}")


@main.command(short_help="Serve an exported .onnx model over HTTP (sdca serve MODEL --help).",
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.pass_context
def serve(ctx):
    """Serve an exported .onnx model over HTTP (ONNX Runtime; `sdca serve MODEL.onnx --help` for options).

    The service is the sdca_serve package, which needs no torch: `python -m sdca_serve MODEL.onnx` runs the same.
    """
    from sdca_serve.__main__ import main as serve_main

    ctx.exit(serve_main(list(ctx.args), prog="sdca serve"))


@main.command(short_help="Run an exported .onnx model as a ROS 2 node (sdca ros MODEL --help).",
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.pass_context
def ros(ctx):
    """Run an exported .onnx model as a ROS 2 segmentation node: sensor_msgs/Image in, mono8 class ids and an rgb8
    colour mask out (`sdca ros MODEL.onnx --help`; `sdca export` writes NAME.ros2.yaml for --ros-args
    --params-file). The node is sdca_serve.ros, which needs no torch: `python -m sdca_serve.ros` runs the same."""
    from sdca_serve.ros import main as ros_main

    ctx.exit(ros_main(list(ctx.args), prog="sdca ros"))


def _parse_size(ctx, param, value):
    from sdca_serve.codec import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _run_name(inputs) -> str:
    """A folder name for an inference run: the first input's base name (a folder's, a file's stem)."""
    first = inputs[0].rstrip("/\\") if inputs else "infer"
    name = os.path.splitext(os.path.basename(first))[0] if os.path.isfile(first) else os.path.basename(first)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return name or "infer"


def _new_folder(parent: str, name: str) -> str:
    """parent/name, or parent/name2, name3, ... : the first that does not exist yet (never an earlier run's)."""
    path, n = os.path.join(parent, name), 2
    while os.path.exists(path):
        path, n = os.path.join(parent, f"{name}{n}"), n + 1
    return path


def _config_entry(spec: str):
    """(config, entry) when ``spec`` reads CONFIG:ENTRY (a preset or YAML file, and source | target | val) and
    is not an existing path or glob; else None."""
    import glob as globbing

    config, sep, entry = spec.rpartition(":")
    if not sep or entry not in ("source", "target", "val") or os.path.exists(spec) or globbing.glob(spec):
        return None
    return config, entry


def _entry_dataset(config: str, entry: str, hint: str, num_classes=None, sized=False, size=None, progress=False):
    """The data set of a config's data entry (its own class count unless given); ``sized``: with the transform
    to ``size``, or to the config's size for that entry. Errors name ``hint``."""
    from .data import build_transform
    from .engine import ConfigError, load_config
    from .engine.builders import build_dataset

    try:
        cfg = load_config(config)
        ds_cfg = getattr(cfg.data, entry)
        if ds_cfg is None:
            raise click.BadParameter(f"{config} has no data.{entry}", param_hint=hint)
        default_size = cfg.data.source_size if entry == "source" else cfg.data.target_size
        transform = build_transform(size=size or default_size) if sized else None
        return build_dataset(ds_cfg, num_classes or cfg.model.num_classes, transform, progress=progress)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def _frames_of(source: str, hint: str = "--calibrate"):
    """A folder or glob as given; CONFIG:ENTRY (a preset or YAML file, and source | target | val) as the image
    paths of that data set."""
    found = _config_entry(source)
    if found is None:
        return source
    dataset = _entry_dataset(*found, hint)
    return [os.path.join(dataset.image_root, name) for name in dataset.names]


def _newest(pattern: str, root: str = "runs"):
    """The most recently written file matching ``pattern`` below ``root`` (None when there is none)."""
    import glob

    found = [p for p in glob.glob(os.path.join(root, "**", pattern), recursive=True) if os.path.isfile(p)]
    return max(found, key=os.path.getmtime) if found else None


@main.command(short_help="Export a checkpoint to ONNX (and side files, a Triton repository).")
@click.argument("checkpoint_arg", metavar="[CHECKPOINT]", required=False, type=click.Path(dir_okay=False))
@click.option("--onnx", "onnx_checkpoint", is_flag=False, flag_value="", default=None, metavar="[CHECKPOINT]",
              help="Export to ONNX (the only format; kept so that `sdca export --onnx CKPT -o M` reads as before).")
@click.option("-o", "--out", type=click.Path(dir_okay=False),
              help="The .onnx file to write (default: model.onnx beside the checkpoint).")
@click.option("--output", type=click.Choice(["logits", "probs", "labels"]), default="logits", show_default=True,
              help="Graph output: logits, softmax probabilities, or an in-graph argmax as uint8 labels.")
@click.option("--fp16", is_flag=True, help="Store weights in float16 (inputs and outputs stay float32).")
@click.option("--opset", default=18, show_default=True, help="ONNX opset (18 suits onnxruntime >= 1.17 and TensorRT 10).")
@click.option("--static-size", callback=_parse_size, metavar="WxH",
              help="Fix every shape (batch 1, this size) for runtimes without dynamic shapes: OpenCV's DNN module "
                   "and the C++ consumer in export/.")
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
@click.option("--describe", "describe_model", type=click.Path(exists=True, dir_okay=False), metavar="MODEL.onnx",
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
@click.option("--calib-size", callback=_parse_size, metavar="WxH",
              help="--int8: the size frames are brought to (default: the model's fixed or training size).")
@click.option("--min-agreement", default=0.98, show_default=True,
              help="--int8: the least share of held-out pixels whose label INT8 and float agree on.")
@click.option("--force", is_flag=True, help="--int8: write the model even below --min-agreement.")
@click.option("--activations", type=click.Choice(["auto", "uint8", "int8"]), default="auto", show_default=True,
              help="--int8: activation type. auto: uint8 on x86-64 (the only kind ONNX Runtime runs as integer "
                   "convolutions there), int8 elsewhere (ARM); recorded in the metadata.")
@_trust_option
def export(checkpoint_arg, onnx_checkpoint, out, output, fp16, opset, static_size, triton_repo, triton_name,
           max_batch, no_check, no_sidecar, describe_model, int8, calibrate, calib_frames, calib_method,
           holdout_frames, holdout, calib_size, min_agreement, force, activations, trust_checkpoint, relu6):
    """Export a checkpoint to ONNX: dynamic batch, height and width (or one fixed size with --static-size),
    upsampling to the input size in the graph, class names, palette and input normalisation in the metadata;
    then a parity check against PyTorch. With --triton, also a Triton model repository.

    Without CHECKPOINT, the newest final checkpoint under runs/. Beside the model go the side files robotics
    stacks read (NAME.labels.txt, NAME.palette.csv, NAME.yaml; --no-sidecar to skip).

    Deploying to a camera unlike the training frames? Run `sdca adapt-bn CHECKPOINT FRAMES... -o ADAPTED.pt`
    first and export ADAPTED.pt: batch-norm statistics of that camera, from unlabelled frames.
    """
    import tempfile

    if describe_model:
        from .deploy.sidecar import describe_text

        try:
            click.echo(describe_text(describe_model), nl=False)
        except (ValueError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
        return
    from .deploy.onnx_export import export_onnx

    checkpoint = onnx_checkpoint or checkpoint_arg
    if onnx_checkpoint and checkpoint_arg:
        raise click.UsageError("give the checkpoint once: `sdca export --onnx CKPT` or `sdca export CKPT`")
    if not checkpoint:
        checkpoint = _newest("final.pt")
        if checkpoint is None:
            raise click.ClickException("no checkpoint given and no final checkpoint under runs/: pass one, or make "
                                       "one with `sdca demo` or `sdca train`")
        click.echo(f"sdca: exporting the newest final checkpoint, {checkpoint}", err=True)
    if not os.path.isfile(checkpoint):
        raise click.BadParameter(f"{checkpoint} does not exist", param_hint="CHECKPOINT")
    if static_size is not None and triton_repo is not None:
        raise click.UsageError("--triton needs the dynamic-batch export: drop --static-size")
    if int8 and fp16:
        raise click.UsageError("--int8 and --fp16 exclude each other: INT8 quantizes the float32 export")
    if int8 and not calibrate:
        raise click.UsageError("--int8 needs --calibrate DIR|GLOB: frames like those the model will see")
    if out is None and triton_repo is None:
        out = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "model.onnx")
    target = out or os.path.join(tempfile.mkdtemp(prefix="sdca-export-"), "model.onnx")
    quant = None
    try:
        if int8:
            from .deploy.quantize import quantize_int8

            float_path = os.path.join(tempfile.mkdtemp(prefix="sdca-export-"), "float.onnx")
            report = export_onnx(checkpoint, float_path, output=output, opset=opset, check=not no_check,
                                 static_size=static_size, trusted=trust_checkpoint, relu6=relu6)
            quant = quantize_int8(float_path, target, _frames_of(calibrate), calib_frames=calib_frames,
                                  held_out_frames=holdout_frames, method=calib_method, size=calib_size,
                                  min_agreement=min_agreement, force=force, held_out=holdout,
                                  activations=activations)
            report["bytes"] = os.path.getsize(target)
        else:
            report = export_onnx(checkpoint, target, output=output, fp16=fp16, opset=opset, check=not no_check,
                                 static_size=static_size, trusted=trust_checkpoint, relu6=relu6)
        if triton_repo is not None:
            from .deploy.triton import write_triton_repository

            folder = write_triton_repository(target, triton_repo, triton_name, max_batch_size=max_batch)
        sidecars = None
        if out and not no_sidecar:
            from .deploy.sidecar import write_sidecars

            sidecars = write_sidecars(out)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
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
    if sidecars:
        click.echo(f"sdca: side files {', '.join(os.path.basename(p) for p in sidecars.values())}")
    for p in report.get("parity", []):
        diff = "n/a" if p["max_abs_diff"] is None else f"{p['max_abs_diff']:.3g}"
        click.echo(f"  parity {'x'.join(map(str, p['shape']))}: max |diff| {diff}, "
                   f"label agreement {100 * p['label_agreement']:.3f}%")
    if triton_repo is not None:
        click.echo(f"sdca: wrote Triton model {folder} (config.pbtxt, 1/model.onnx; max_batch_size {max_batch})")


@main.command(short_help="Segment files, folders, globs or videos with an exported model or a checkpoint.")
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
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--providers", help="ONNX Runtime providers in priority order, e.g. tensorrt,cuda,cpu.")
@click.option("--batch", default=4, show_default=True, help="Frames per model call (frames of one size).")
@click.option("--size", nargs=2, type=int, metavar="W H", help="Resize frames for the model (outputs keep the frame size).")
@click.option("--workers", default=4, show_default=True, help="Decoding and encoding threads.")
@click.option("--color", is_flag=True, help="Colour label maps (the default when no output is chosen).")
@click.option("--overlay", is_flag=True, help="Colours alpha-blended on the frame (JPEG).")
@click.option("--trainid", is_flag=True, help="trainId PNGs (class indices, 255 = none).")
@click.option("--labelid", is_flag=True, help="Cityscapes labelId PNGs, for the official evaluation server.")
@click.option("--confidence", is_flag=True, help="Max softmax probability per pixel, as 8-bit PNGs (x255).")
@click.option("--opacity", default=0.5, show_default=True, help="Overlay opacity.")
@click.option("--video-stride", default=1, show_default=True, help="Segment every n-th video frame.")
@click.option("--skip-existing", is_flag=True, help="Skip frames whose outputs all exist (resume a run).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_trust_option
def infer(inputs, model, out, backend, device, providers, batch, size, workers, color, overlay, trainid, labelid,
          confidence, opacity, video_stride, skip_existing, quiet, trust_checkpoint, precision):
    """Segment INPUTS (files, folders searched recursively, glob patterns, videos) into OUT.

    Outputs go to OUT/<kind>/<input path>.png, one folder per requested kind; OUT/summary.json lists frames,
    failures, wall time and frames/s. Unreadable inputs are reported and skipped (exit status 2).
    """
    from .deploy.infer import run_inference
    from .deploy.runtime import open_segmenter

    if model is None:
        model = os.environ.get("SDCA_MODEL") or _newest("*.onnx")
        if model is None:
            raise click.ClickException("no model: pass --model MODEL.onnx (or a checkpoint), set SDCA_MODEL, or make "
                                       "one with `sdca demo` (it exports runs/demo/model.onnx) or `sdca export`")
        if not os.path.isfile(model):
            raise click.BadParameter(f"{model} does not exist", param_hint="SDCA_MODEL")
    if out is None:
        out = _new_folder(os.path.join("runs", "infer"), _run_name(inputs))
    click.echo(f"sdca: model {model}; outputs in {out}", err=True)
    kinds = [k for k, on in (("color", color), ("overlay", overlay), ("trainid", trainid), ("labelid", labelid),
                             ("confidence", confidence)) if on] or ["color"]
    try:
        segmenter = open_segmenter(model, backend, providers=providers.split(",") if providers else None,
                                   device=device, trusted=trust_checkpoint, precision=precision)
        click.echo(f"sdca: {segmenter.backend} on {', '.join(segmenter.providers)}", err=True)
        summary = run_inference(segmenter, inputs, out, outputs=kinds, batch=batch, size=size, workers=workers,
                                skip_existing=skip_existing, progress=not quiet, opacity=opacity,
                                video_stride=video_stride)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"sdca: {summary['frames']} frames in {summary['wall_time_s']} s ({summary['frames_per_s']} frames/s)"
               f", {summary['skipped_existing']} skipped, {len(summary['failures'])} failed; see {out}/summary.json")
    for failure in summary["failures"][:10]:
        click.echo(f"  failed: {failure['file']}: {failure['reason']}", err=True)
    if summary["failures"]:
        sys.exit(2)



@main.command("adapt-bn", short_help="Re-estimate batch-norm statistics on unlabelled target frames (AdaBN).")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("targets", nargs=-1, required=True, metavar="TARGET...")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), metavar="ADAPTED.pt",
              help="Where the adapted checkpoint goes (written atomically).")
@click.option("--frames", "max_frames", default=500, show_default=True, type=click.IntRange(1),
              help="At most this many frames (a fixed random subset when there are more).")
@click.option("--size", callback=_parse_size, metavar="WxH",
              help="The size frames are brought to (default: the model's training size).")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(2),
              help="Frames per batch (statistics are averaged over batches).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_trust_option
def adapt_bn(checkpoint, targets, out, max_frames, size, batch_size, device, quiet, trust_checkpoint):
    """AdaBN: CHECKPOINT with every batch norm's running mean and variance re-estimated on TARGET frames (folders,
    glob patterns, image files, or a config's data set entry such as my.yaml:target), written to ADAPTED.pt.

    No labels, no source data, no training: one pass over frames from the camera the model will run on. Use it
    after training on a simulator and before `sdca export`, whenever the deployment camera differs from the
    training frames; on SynthDrive it gave most of adaptation's measured gain (README). Models trained with
    frozen batch norm keep that mode; a model without batch norm (VGG-16) is refused.
    """
    from .deploy.quantize import find_frames
    from .device import resolve_device
    from .engine.adapt_bn import adapt_batchnorm

    if not os.path.isfile(checkpoint):
        raise click.BadParameter(f"{checkpoint} does not exist", param_hint="CHECKPOINT")
    frames = []
    for target in targets:
        found = _frames_of(target, "TARGET")
        try:
            frames += found if isinstance(found, list) else find_frames(found, "target frames")
        except FileNotFoundError as exc:
            raise click.BadParameter(str(exc), param_hint="TARGET") from None
    try:
        summary = adapt_batchnorm(checkpoint, frames, out, max_frames=max_frames, size=size,
                                  batch_size=batch_size, device=str(resolve_device(device)), progress=not quiet,
                                  trusted=trust_checkpoint)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"sdca: re-estimated {summary['layers']} batch-norm layers on {summary['frames']} frames "
               f"({summary['batches']} batches) -> {out}")


def _inspect_data(spec: str, hint: str, num_classes: int, size, default_size):
    """CONFIG:ENTRY (a preset or YAML file and source | target | val) -> that data set at the config's size;
    a folder or glob of images -> unlabelled frames at ``size`` or the model's training size."""
    from .data import ImageFolder, build_transform

    found = _config_entry(spec)
    if found is not None:
        return _entry_dataset(*found, hint, num_classes, sized=True, size=size, progress=True)
    from .deploy.quantize import find_frames

    try:
        frames = find_frames(spec, "frames")
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None
    return ImageFolder.from_files(frames, transform=build_transform(size=size or default_size))


# 'folder' needs a label folder and a mapping besides its root: it goes through a YAML entry.
INSPECT_SOURCE_KINDS = ("gta5", "synthia", "cityscapes", "crosscity")


def _inspect_domain(which, spec, kind, root, split, city, labelled, num_classes, size, default_size):
    """One domain of ``sdca inspect``: exactly one of --WHICH (CONFIG:ENTRY, DIR, GLOB) and --WHICH-data with
    --WHICH-root; a kind's frames run at --size or the model's training size."""
    if spec and (kind or root):
        raise click.UsageError(f"give --{which} or --{which}-data/--{which}-root, not both")
    if spec:
        return _inspect_data(spec, f"--{which}", num_classes, size, default_size)
    if not (kind and root):
        raise click.UsageError(f"the {which} data is missing: give --{which} CONFIG:ENTRY"
                               f"{'|DIR|GLOB' if which == 'target' else ''} or --{which}-data KIND --{which}-root DIR")
    return _build(kind, root, split, None, None, city, None, num_classes, labelled=labelled or kind != "cityscapes",
                  size=size or default_size)


@main.command(short_help="Is adaptation working? Class shares, masks, alignment, feature map of a checkpoint.")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--source", "source_spec", metavar="CONFIG:ENTRY",
              help="Labelled source frames: a preset or YAML file and its data entry, e.g. my.yaml:source "
                   "(or --source-data/--source-root).")
@click.option("--source-data", type=click.Choice(INSPECT_SOURCE_KINDS),
              help="Source data set kind (with --source-root).")
@click.option("--source-root", type=click.Path(exists=True, file_okay=False), help="Source data set root.")
@click.option("--target", "target_spec", metavar="CONFIG:ENTRY|DIR|GLOB",
              help="Target frames: a data entry (e.g. my.yaml:val, labelled) or a folder / glob of images "
                   "(or --target-data/--target-root).")
@click.option("--target-data", type=click.Choice(INSPECT_SOURCE_KINDS + ("images",)),
              help="Target data set kind (with --target-root).")
@click.option("--target-root", type=click.Path(exists=True, file_okay=False), help="Target data set root.")
@click.option("--target-split", default=None,
              help="Split of --target-data (cityscapes: train/val, default val; crosscity: train/test, default test).")
@click.option("--city", help="'crosscity': Rome, Rio, Tokyo or Taipei.")
@click.option("--target-labels", is_flag=True,
              help="Use the target entry's labels: precision / recall of the Eq. 5 mask and Eq. 19 pseudo-labels, "
                   "confusion matrix.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output folder [default: inspect/ beside the checkpoint].")
@click.option("--frames", default=50, show_default=True, type=click.IntRange(1),
              help="Frames of each domain (a fixed random subset).")
@click.option("--size", callback=_parse_size, metavar="WxH", help="Frame size for both domains (default: the "
              "config's source/target sizes, or the model's training size for folders and --*-data).")
@click.option("--map", "feature_map", type=click.Choice(["pca", "tsne"]), default="pca", show_default=True,
              help="2-D map of sampled pixel features: PCA (fast, deterministic) or t-SNE (scikit-learn).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_trust_option
def inspect(checkpoint, source_spec, source_data, source_root, target_spec, target_data, target_root, target_split,
            city, target_labels, out, frames, size, feature_map, device, quiet, trust_checkpoint):
    """Diagnostics a user can read without target labels: per class, the target's predicted share vs the
    source label share (KL), confidence, entropy and the share passing the Eq. 5 mask and Eq. 19 thresholds;
    the distance of target features to the checkpoint's source Gaussians beside the source's own, and PDD;
    a 2-D feature map of both domains. With --target-labels: mask precision / recall and the confusion matrix.
    Writes OUT/inspect.json, OUT/inspect.md and PNG figures."""
    from .device import resolve_device
    from .engine.inspect import InspectError, inspect_checkpoint
    from .models import read_checkpoint
    from .models.deeplab import ModelInfo

    if not os.path.isfile(checkpoint):
        raise click.BadParameter(f"{checkpoint} does not exist", param_hint="CHECKPOINT")
    try:
        ckpt = read_checkpoint(checkpoint, trusted=trust_checkpoint)
        info = ModelInfo.from_dict(ckpt["model"]["info"]) if ckpt.get("format") == "sdca-checkpoint" else None
    except (ValueError, KeyError) as exc:
        raise click.BadParameter(str(exc), param_hint="CHECKPOINT") from None
    num_classes = info.num_classes if info else 19
    default_size = info.train_size if info else None
    source = _inspect_domain("source", source_spec, source_data, source_root, None, city, True, num_classes, size,
                             default_size)
    target = _inspect_domain("target", target_spec, target_data, target_root, target_split, city, target_labels,
                             num_classes, size, default_size)
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "inspect")
    try:
        result = inspect_checkpoint(checkpoint, source, target, out, target_labels=target_labels, frames=frames,
                                    device=str(resolve_device(device)), feature_map=feature_map, progress=not quiet,
                                    ckpt=ckpt)
    except InspectError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"sdca: KL(target predicted || source labels) = {result['kl_target_predicted_vs_source_labels']:.3f}"
               + (f"; skipped: {'; '.join(result['skipped'])}" if result["skipped"] else ""))
    click.echo(f"sdca: inspect report: {os.path.join(out, 'inspect.md')}")


if __name__ == "__main__":
    main()
