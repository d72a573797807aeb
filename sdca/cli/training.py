"""`sdca train`, `sdca demo`, `sdca experiment`."""
from __future__ import annotations

import os
import sys

import click

from ..engine.stages import STAGE_NAMES
from .options import bad_parameter, command, device_option, library_errors, quiet_option, trust_option


def _config(config, overrides, **direct):
    from ..engine.config import load_config

    with bad_parameter("--set / CONFIG"):
        return load_config(config, list(overrides), **direct)


@command(short_help="Train: source, init-stats, adapt, pseudo-label, self-train.")
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
@device_option(default=None, help="auto (default), cpu, cuda or cuda:N.")
@quiet_option()
@click.option("--print-recipe", is_flag=True,
              help="Print the resolved per-stage recipe (lr, schedule, batch per process and global, batch norm, "
                   "input, augmentation, sampling) and exit without training.")
@click.option("--world-size", type=click.IntRange(1), default=None, metavar="N",
              help="With --print-recipe: the number of processes the global batches are given for "
                   "(default: WORLD_SIZE, else 1).")
@trust_option
@library_errors()
def train(config, overrides, stages, name, output_dir, init_checkpoint, no_pretrained, amp, device, quiet,
          print_recipe, world_size, trust_checkpoint):
    """Run the SDCA pipeline: source -> init-stats -> adapt -> pseudo-label -> self-train.

    CONFIG is a YAML file or a packaged preset (gta5_cityscapes_r101, gta5_cityscapes_vgg16,
    synthia_cityscapes_r101, synthia_cityscapes_vgg16, cityscapes_crosscity_r101, default). Every stage
    resumes from its last checkpoint if interrupted, and a finished stage is skipped, so rerunning the same
    command continues a run. Under torchrun (`torchrun --nproc-per-node N -m sdca train ...`) each process
    takes its share of every batch.
    """
    direct = {key: value for key, value in (("name", name), ("output_dir", output_dir), ("amp", amp),
                                            ("device", device)) if value}
    if no_pretrained:
        direct["model"] = {"no_pretrained": True}
    if stages:
        direct["stages"] = list(stages)
    cfg = _config(config or "default", overrides, **direct)
    if print_recipe:
        from ..engine.recipe import format_recipe

        with bad_parameter("--set / CONFIG"):
            click.echo(format_recipe(cfg, world_size or int(os.environ.get("WORLD_SIZE", "1"))))
        return
    from ..engine import Interrupted, Runner
    from ..engine.data_specs import check_data
    from ..engine.distributed import shutdown

    check_data(cfg, config or "default")
    runner = None
    try:
        runner = Runner(cfg, progress=not quiet, init_checkpoint=init_checkpoint, trust_checkpoint=trust_checkpoint)
        result = runner.train()
    except Interrupted as exc:
        click.echo(f"sdca: {exc}", err=True)
        sys.exit(130 if exc.signal_name == "SIGINT" else 143)
    finally:
        if runner is not None:
            shutdown(runner.dist)
    if runner.dist.is_main:
        click.echo(f"sdca: run {cfg.name} finished stages {', '.join(result['stages'])} in {result['seconds']} s; "
                   f"outputs in {result['run_dir']}")


@command(short_help="The whole pipeline on the embedded SynthDrive data, with a report.")
@click.option("--quick", is_flag=True, help="A small, fast run (about 2 minutes on 2 cores) that still runs every stage.")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run folder; the SynthDrive frames are cached beside it.")
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@quiet_option()
def demo(quick, out, seed, quiet):
    """The whole pipeline on the embedded SynthDrive data, on the CPU: source-only, init-stats, adapt,
    pseudo-label and self-train with the small model, each stage evaluated on held-out 'real' frames, the final
    model exported to ONNX and run on a few frames; writes OUT/report.md."""
    from ..engine.demo import run_demo

    if os.path.isdir(out) and os.path.isfile(os.path.join(out, "config.yaml")):
        click.echo(f"sdca: {out} exists: finished stages are reused (delete the folder for a fresh run)", err=True)
    path = run_demo(out, quick=quick, seed=seed, progress=not quiet)
    click.echo(f"sdca: demo finished; report: {path}")


def _seeds(ctx, param, value):
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integers, got {value!r}") from None
    if not seeds or 0 not in seeds:
        raise click.BadParameter("must include seed 0 (the validation sweep runs on it)")
    return seeds


@command(short_help="The controlled SynthDrive experiment (seeds, controls, validation sweep).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Experiment folder (one sub-folder per run, results/, report.md); SynthDrive is cached beside "
                   "it. [default: runs/experiment, runs/experiment-lite0 for --model lite0]")
@click.option("--model", "model", type=click.Choice(["small", "lite0"]), default="small", show_default=True,
              help="small: the width-16 network from scratch at 256x128; lite0: EfficientNet-Lite0 from ImageNet "
                   "at 384x192, output stride 16 (about 1.5 hours on 2 cores with --jobs 2).")
@click.option("--seeds", default="0,1,2", show_default=True, callback=_seeds, help="Comma-separated seeds.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Runs at a time (each gets cores / jobs threads).")
@click.option("--quick", is_flag=True, help="Tiny frame counts and iterations: checks the plumbing, measures nothing.")
@click.option("--mean-teacher-only", is_flag=True,
              help="Only the controls and the mean-teacher rows, at the recipe's defaults unless --sweep-mean-teacher "
                   "(no SDCA rows, no SDCA sweep).")
@click.option("--sweep-mean-teacher", is_flag=True,
              help="With --mean-teacher-only: choose the mean teacher's alpha, threshold and contrast (lambda, "
                   "tau) on the validation split (seed 0) first, instead of the recipe's defaults: six more runs. "
                   "With the sweep, about 1 hour in all for the small model and 1.6 hours for Lite0 on 2 cores "
                   "with --jobs 2.")
def experiment(out, model, seeds, jobs, quick, mean_teacher_only, sweep_mean_teacher):
    """The controlled SynthDrive experiment docs/results.md reports: source-only, oracle, AdaBN, self-training,
    the lambda = 0 control, SDCA (paper and public-code losses), SDCA + self-training, and the one-stage mean
    teacher (without contrast, with SDCA's loss on a projection head or on the backbone, without ClassMix), over
    several seeds, with every setting chosen on a validation split. Resumes where it stopped; writes
    OUT/report.md."""
    from ..engine.experiment import run_experiment

    if sweep_mean_teacher and not mean_teacher_only:
        raise click.UsageError("--sweep-mean-teacher goes with --mean-teacher-only (the full experiment always "
                               "sweeps the mean teacher)")
    out = out or ("runs/experiment" if model == "small" else f"runs/experiment-{model}")
    path = run_experiment(out, seeds=seeds, jobs=jobs, quick=quick, model=model,
                          log=lambda m: click.echo(f"sdca: {m}"), mean_teacher_only=mean_teacher_only,
                          sweep_mean_teacher=sweep_mean_teacher)
    click.echo(f"sdca: experiment report: {path}")


COMMANDS = (train, demo, experiment)
