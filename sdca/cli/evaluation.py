"""`sdca evaluate`, `sdca pseudo-label`, `sdca inspect`: a checkpoint against data."""
from __future__ import annotations

import json
import os

import click

from ..data.kinds import ROOT_ONLY_LABELLED_KINDS
from .options import (
    bad_parameter,
    command,
    dataset_options,
    device_option,
    existing_file,
    library_errors,
    quiet_option,
    size_option,
    trust_option,
)

INSPECT_SOURCE_KINDS = ROOT_ONLY_LABELLED_KINDS


def _load(checkpoint, device, trusted):
    from ..device import resolve_device
    from ..models import load_model

    dev = resolve_device(device)
    return load_model(checkpoint, device=dev, trusted=trusted), dev


@command(short_help="Score a checkpoint on a labelled split (per-class IoU, mIoU).")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@dataset_options
@click.option("--flip", is_flag=True, help="Average with the horizontally flipped prediction.")
@click.option("--scales", multiple=True, type=float, help="Multi-scale test: scales of --size (repeatable).")
@click.option("--pdd", is_flag=True, help="Also report the PDD of Eq. 25 per class (needs statistics in the checkpoint).")
@click.option("--save-predictions", type=click.Path(file_okay=False), help="Write each prediction as a PNG here.")
@click.option("--labelid", is_flag=True, help="Write Cityscapes labelIds (for the official evaluation scripts).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the results as JSON.")
@trust_option
@library_errors()
def evaluate(checkpoint, kind, root, split, labels, mapping, city, list_file, size, resize, device, workers, flip,
             scales, pdd, save_predictions, labelid, json_out, trust_checkpoint):
    """Score CHECKPOINT on a labelled split: per-class IoU, mIoU (and the 13-class mIoU* for 16-class models,
    tail-class mIoU for 19-class ones). Predictions are resized to each label's resolution."""
    from .._atomic import atomic_write_text
    from ..engine.data_specs import kind_dataset
    from ..engine.evaluator import checkpoint_feature_statistics, format_table, standard_subsets
    from ..engine.evaluator import evaluate as run_evaluate

    model, dev = _load(checkpoint, device, trust_checkpoint)
    dataset = kind_dataset(kind, root, model.num_classes, split, labels, mapping, city, list_file)
    stats = checkpoint_feature_statistics(checkpoint, trust_checkpoint) if pdd else None
    summary = run_evaluate(model, dataset, device=dev, size=size, scales=scales or (1.0,), flip=flip,
                           save_dir=save_predictions, labelid_png=labelid, pdd_stats=stats,
                           subsets=standard_subsets(model.num_classes), workers=workers, resize=resize)
    click.echo(format_table(summary))
    if summary.get("unreadable"):
        click.echo(f"sdca: {len(summary['unreadable'])} unreadable image(s) left out, e.g. {summary['unreadable'][0]}",
                   err=True)
    if json_out:
        atomic_write_text(json_out, json.dumps(summary, indent=2))


@command("pseudo-label", short_help="Write Eq. 19 pseudo-labels for a folder or data set of target frames.")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@dataset_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the label maps.")
@click.option("--cap", default=0.9, show_default=True, help="Cap on the class thresholds (the public code's 0.9).")
@trust_option
@library_errors()
def pseudo_label(checkpoint, kind, root, split, labels, mapping, city, list_file, size, resize, device, workers, out,
                 cap, trust_checkpoint):
    """Write Eq. 19 pseudo-labels for every target image: per-class median confidence thresholds over the whole
    set (exact, streamed), label PNGs (255 below threshold) and thresholds.json with each class's share."""
    from ..engine.data_specs import kind_dataset
    from ..engine.pseudo_label import generate_pseudo_labels

    model, dev = _load(checkpoint, device, trust_checkpoint)
    dataset = kind_dataset(kind, root, model.num_classes, split or "train", labels, mapping, city, list_file,
                           labelled=False)
    report = generate_pseudo_labels(model, dataset, out, device=dev, size=size, cap=cap, workers=workers,
                                    resize=resize)
    click.echo(f"sdca: {report['images']} label maps in {out}; {100 * report['ignored_share']:.1f}% of pixels "
               "left unlabelled; thresholds in thresholds.json")
    if report["unreadable"]:
        click.echo(f"sdca: {len(report['unreadable'])} unreadable frame(s) skipped, no label written, e.g. "
                   f"{report['unreadable'][0]}", err=True)


def _inspect_domain(which, spec, kind, root, split, city, labelled, num_classes, size, default_size):
    """One domain of ``sdca inspect``: exactly one of --WHICH (CONFIG:ENTRY, DIR, GLOB) and --WHICH-data with
    --WHICH-root; a kind's frames run at --size or the model's training size."""
    from ..engine.data_specs import frames_dataset, kind_dataset

    if spec and (kind or root):
        raise click.UsageError(f"give --{which} or --{which}-data/--{which}-root, not both")
    if spec:
        with bad_parameter(f"--{which}"):
            return frames_dataset(spec, num_classes, size, default_size)
    if not (kind and root):
        raise click.UsageError(f"the {which} data is missing: give --{which} CONFIG:ENTRY"
                               f"{'|DIR|GLOB' if which == 'target' else ''} or --{which}-data KIND --{which}-root DIR")
    return kind_dataset(kind, root, num_classes, split, city=city, labelled=labelled or kind != "cityscapes",
                        size=size or default_size)


@command(short_help="Is adaptation working? Class shares, masks, alignment, feature map of a checkpoint.")
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
@size_option(help="Frame size for both domains (default: the config's source/target sizes, or the model's training "
                  "size for folders and --*-data).")
@click.option("--map", "feature_map", type=click.Choice(["pca", "tsne"]), default="pca", show_default=True,
              help="2-D map of sampled pixel features: PCA (fast, deterministic) or t-SNE (scikit-learn).")
@device_option()
@quiet_option()
@trust_option
@library_errors()
def inspect(checkpoint, source_spec, source_data, source_root, target_spec, target_data, target_root, target_split,
            city, target_labels, out, frames, size, feature_map, device, quiet, trust_checkpoint):
    """Diagnostics a user can read without target labels: per class, the target's predicted share vs the
    source label share (KL), confidence, entropy and the share passing the Eq. 5 mask and Eq. 19 thresholds;
    the distance of target features to the checkpoint's source Gaussians beside the source's own, and PDD;
    a 2-D feature map of both domains. With --target-labels: mask precision / recall and the confusion matrix.
    Writes OUT/inspect.json, OUT/inspect.md and PNG figures."""
    from ..device import resolve_device
    from ..engine.inspect import inspect_checkpoint, read_for_inspect

    existing_file(checkpoint, "CHECKPOINT")
    with bad_parameter("CHECKPOINT"):
        ckpt, num_classes, default_size = read_for_inspect(checkpoint, trust_checkpoint)
    source = _inspect_domain("source", source_spec, source_data, source_root, None, city, True, num_classes, size,
                             default_size)
    target = _inspect_domain("target", target_spec, target_data, target_root, target_split, city, target_labels,
                             num_classes, size, default_size)
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "inspect")
    result = inspect_checkpoint(checkpoint, source, target, out, target_labels=target_labels, frames=frames,
                                device=str(resolve_device(device)), feature_map=feature_map, progress=not quiet,
                                ckpt=ckpt)
    click.echo(f"sdca: KL(target predicted || source labels) = {result['kl_target_predicted_vs_source_labels']:.3f}"
               + (f"; skipped: {'; '.join(result['skipped'])}" if result["skipped"] else ""))
    click.echo(f"sdca: inspect report: {os.path.join(out, 'inspect.md')}")


COMMANDS = (evaluate, pseudo_label, inspect)
