"""`sdca demo`: the whole product on the embedded SynthDrive data, on a CPU, with a report.

source-only -> init-stats -> adapt -> pseudo-label -> self-train with the small model; every stage evaluated
on a held-out labelled split of the 'real' domain; the final model exported to ONNX and run with
`sdca infer` on a few target frames; ``report.md`` with a per-class IoU table per stage, training curves
and a qualitative grid (input, ground truth, source-only, SDCA, SDCA + self-training). The numbers are what
this run measures; the controlled comparison docs/results.md reports is a separate experiment.
"""
from __future__ import annotations

import json
import os
import time
from typing import List, Optional

import numpy as np

from . import markdown as md
from .config import load_config
from .plan import Plan

FULL = Plan(300, 300, 100, source_iters=600, adapt_iters=300, self_train_iters=300, batch=4)
QUICK = Plan(40, 40, 12, source_iters=40, adapt_iters=20, self_train_iters=20, batch=2)


# The models the SynthDrive runs can use: the small scratch network (the demo's, the first experiment's) and
# EfficientNet-Lite0 from ImageNet at output stride 16 (stride 8 measured 3.4x slower per step at 512 x 256) on
# 384 x 192 frames: 512 x 256 would cost 1.8x more per step, which the 2-hour budget of the experiment on two
# cores does not hold with three seeds and every control (docs/results.md, "SDCA from ImageNet").
SYNTHDRIVE_MODELS = {
    "small": {"model": {"arch": "deeplabv2_small", "num_classes": 19, "width": 16, "bn": "train",
                        "no_pretrained": True},
              "size": (256, 128), "crop": (192, 96), "lr": (0.01, 0.002, 0.002)},
    "lite0": {"model": {"arch": "deeplabv2_lite0", "num_classes": 19, "bn": "train", "pretrained": "imagenet",
                        "output_stride": 16},
              "size": (384, 192), "crop": (288, 144), "lr": (0.01, 0.002, 0.002)},
}


def synthdrive_config(run_dir: str, plan, seed: int, cache: str, *, source_domain: str = "sim",
                      val_split: str = "test", method: Optional[dict] = None, model: str = "small",
                      model_overrides: Optional[dict] = None, mean_teacher: Optional[dict] = None,
                      target_labels: bool = False, device: str = "cpu", frame_size=None, amp=None):
    """The SynthDrive configuration shared by the demo and the controlled experiments.

    ``plan``: a :class:`Plan` (or its dict form): frames, steps per stage, batch. ``source_domain="real"``
    trains on the labelled real frames that are otherwise the unlabelled target set (the oracle). ``model``:
    a key of SYNTHDRIVE_MODELS (its architecture, frame size and learning rates); ``model_overrides`` change
    single model settings (e.g. ``{"bn": "frozen"}``). The mean-teacher stage (``plan.mt_iters`` steps, the
    adaptation stages' SGD and learning rate, so that rows differ in the method only) takes ``mean_teacher``
    (method.mean_teacher settings). ``target_labels``: the target stream carries its labels, for the stages'
    monitoring only (pseudo-label precision); no loss reads them. ``device``, ``frame_size`` (width, height;
    the crop scales with it) and ``amp``: the GPU script's larger scale (scripts/experiment_gpu.py).
    """
    plan = Plan.of(plan)
    n_src, n_tgt, n_val = plan.source_frames, plan.target_frames, plan.val_frames
    it_src, it_adapt, it_st = plan.source_iters, plan.adapt_iters, plan.self_train_iters
    spec = SYNTHDRIVE_MODELS[model]
    size, (lr_src, lr_adapt, lr_st) = list(spec["size"]), spec["lr"]
    crop = list(spec["crop"])
    if frame_size is not None:
        crop = [c * f // s for c, f, s in zip(crop, frame_size, size)]
        size = list(frame_size)
    sd = lambda domain, split, n, labelled=True: {  # noqa: E731
        "kind": "synthdrive", "root": cache, "domain": domain, "split": split, "num_frames": n,
        "frame_size": size, "labelled": labelled}
    source = sd("real", "train", n_tgt) if source_domain == "real" else sd("sim", "train", n_src)
    it_mt = plan.mt_iters
    return load_config(None, [], name=os.path.basename(os.path.abspath(run_dir)),
                       output_dir=os.path.dirname(os.path.abspath(run_dir)), device=device, seed=seed, amp=amp,
                       model=dict(spec["model"], **(model_overrides or {})),
                       data={"source": source, "target": sd("real", "train", n_tgt, target_labels),
                             "val": sd("real", val_split, n_val), "source_size": size,
                             "target_size": size, "self_train_crop": crop, "batch_size": plan.batch,
                             "workers": 1},
                       solver={"source": {"iters": it_src, "lr": lr_src}, "adapt": {"iters": it_adapt, "lr": lr_adapt},
                               "self_train": {"iters": it_st, "lr": lr_st},
                               "mean_teacher": {"iters": it_mt, "lr": lr_adapt, "optimizer": "sgd", "power": None,
                                                "warmup_iters": 0, "weight_decay": None},
                               "checkpoint_period": max(10, it_src // 4), "log_period": max(1, it_src // 40)},
                       method=dict(DEMO_METHOD, **(method or {}), mean_teacher=dict(mean_teacher or {})))


# The adaptation settings the demo runs: those the experiment's validation sweep chose (docs/results.md, "What SDCA does
# on SynthDrive"): target batch-norm statistics, lambda 0.1, tau 0.5, the class-balanced target mask.
DEMO_METHOD = {"variant": "paper", "covariance": "full", "tau": 0.5, "lambda_feat": 0.1, "lambda_out": 0.1,
               "delta": 0.9, "adaptation_bn": "target", "class_balanced_mask": True}


def demo_config(out_dir: str, quick: bool, seed: int, cache: str):
    return synthdrive_config(out_dir, QUICK if quick else FULL, seed, cache)


def run_demo(out_dir: str = "runs/demo", *, quick: bool = False, seed: int = 0, progress: bool = True) -> str:
    """Run the demo into ``out_dir``; returns the path of report.md. Rerunning resumes/skips finished work."""
    import torch

    from ..data.synthdrive import GENERATOR_VERSION
    from ..deploy.infer import run_inference
    from ..deploy.onnx_export import export_onnx
    from ..deploy.runtime import open_segmenter
    from ..models import load_model
    from .builders import build_dataset
    from .evaluator import evaluate
    from .plots import plot_curves
    from .runner import Runner

    start = time.time()
    cache = os.path.join(os.path.dirname(os.path.abspath(out_dir)), "synthdrive-cache")
    cfg = demo_config(out_dir, quick, seed, cache)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runner = Runner(cfg, progress=progress)
    runner.train()
    test = build_dataset(cfg.data.val, 19)
    stages = {"source-only": "source", "SDCA (adapt)": "adapt", "SDCA + self-training": "self-train"}
    results, models = {}, {}
    for title, stage in stages.items():
        model = load_model(runner.final_path(stage))
        models[title] = model
        results[title] = evaluate(model, test, device=torch.device("cpu"), size=cfg.data.target_size,
                                  subsets=None, progress=False)
    onnx_path = os.path.join(out_dir, "model.onnx")
    export = export_onnx(runner.final_path("self-train"), onnx_path)
    frames = os.path.join(cache, GENERATOR_VERSION, "real_256x128", "train", "images")
    sample = sorted(os.listdir(frames))[:8]
    infer_in = [os.path.join(frames, n) for n in sample]
    infer = run_inference(open_segmenter(onnx_path), infer_in, os.path.join(out_dir, "infer"),
                          outputs=("color", "overlay"), progress=False)
    plot_curves(os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "curves.png"))
    _grid(models, test, os.path.join(out_dir, "qualitative.png"))
    inspected = inspect_pair(runner, cfg, out_dir, frames=12 if quick else 40, progress=progress)
    report = _report(cfg, results, export, infer, quick, time.time() - start, GENERATOR_VERSION, inspected)
    path = os.path.join(out_dir, "report.md")
    from .._atomic import atomic_write_text

    atomic_write_text(path, report)
    atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2))
    return path


INSPECTED = {"source-only": "init-stats", "SDCA (adapt)": "adapt"}  # init-stats: the source weights + statistics


def inspect_pair(runner, cfg, out_dir: str, frames: int, progress: bool = False) -> dict:
    """`sdca inspect` on the source-only model and the adapted one: source frames vs the labelled test split.
    Returns {title: inspect result} (written under out_dir/inspect/<stage>/)."""
    from .inspect import inspect_checkpoint, labelled_domains

    source, target = labelled_domains(cfg)
    results = {}
    for title, stage in INSPECTED.items():
        results[title] = inspect_checkpoint(runner.final_path(stage), source, target,
                                            os.path.join(out_dir, "inspect", stage), target_labels=True,
                                            frames=frames, progress=progress, title=title)
    return results


def _report(cfg, results, export, infer, quick, seconds, version, inspected=None) -> str:
    names = list(next(iter(results.values()))["IoU"])
    lines = [f"# sdca demo{' (--quick)' if quick else ''}", "",
             f"SynthDrive {version} (sim -> real), model {cfg.model.arch} (width {cfg.model.width}, from scratch), "
             f"{cfg.data.source.num_frames} source / {cfg.data.target.num_frames} target frames, held-out test: "
             f"{cfg.data.val.num_frames} labelled real frames at {cfg.data.target_size[0]}x{cfg.data.target_size[1]}. "
             f"Iterations: source {cfg.solver.source.iters}, adapt {cfg.solver.adapt.iters}, self-train "
             f"{cfg.solver.self_train.iters}. Loss: {cfg.method.variant} variant, {cfg.method.covariance} covariance, "
             f"tau {cfg.method.tau}, lambda_feat {cfg.method.lambda_feat}, lambda_out {cfg.method.lambda_out}; "
             f"batch norm during adaptation: {cfg.method.adaptation_bn}; target mask: "
             f"{'class-balanced' if cfg.method.class_balanced_mask else 'Eq. 5'} (delta {cfg.method.delta}). "
             f"Wall time {seconds:.0f} s.", "",
             "One run, one seed: differences between rows are not significant by themselves (see docs/results.md for "
             "the controlled experiment).", "",
             *md.header(["class", *results], "l" + "r" * len(results))]
    for n in names:
        cells = [results[r]["IoU"][n] for r in results]
        if all(c is None for c in cells):
            continue
        lines.append(md.row([n, *("n/a" if c is None else f"{100 * c:.1f}" for c in cells)]))
    lines.append(md.row(["**mIoU**", *(f"**{100 * (r['mIoU'] or 0):.1f}**" for r in results.values())]))
    parity = export.get("parity", [])
    lines += ["", "![training curves](curves.png)", "", "![input, ground truth, source-only, SDCA, SDCA + self-training]"
              "(qualitative.png)", "",
              f"ONNX export: `model.onnx` ({export['bytes'] / 2**20:.1f} MiB); parity with PyTorch: "
              + ", ".join(f"{'x'.join(map(str, p['shape']))} max |diff| {p['max_abs_diff']:.2g}, labels "
                          f"{100 * p['label_agreement']:.2f}%" for p in parity) + ".",
              f"`sdca infer` on {infer['frames']} target frames: {infer['frames_per_s']} frames/s "
              f"({infer['backend']}), outputs in `infer/`.", ""]
    if inspected:
        from .inspect import compare_markdown

        lines += ["## Is adaptation working? `sdca inspect`, source-only vs adapted", "",
                  "Source frames vs the labelled test split (its labels give the precisions); full reports in "
                  "`inspect/init-stats/inspect.md` and `inspect/adapt/inspect.md`.", ""]
        lines += compare_markdown(inspected, {t: f"inspect/{s}" for t, s in INSPECTED.items()}) + [""]
    return "\n".join(lines)


def _grid(models: dict, test, out: str, rows: int = 4) -> None:
    """Input | ground truth | each model's prediction, for the first ``rows`` test frames."""
    import torch
    from PIL import Image

    from ..data.labels import CITYSCAPES
    from .evaluator import predict_probabilities

    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:19] = np.asarray(CITYSCAPES.palette, dtype=np.uint8)
    tiles: List[np.ndarray] = []
    for i in range(min(rows, len(test))):
        item = test[i]
        image = (item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        row = [image, palette[item["label"].numpy().astype(np.uint8)]]
        for model in models.values():
            with torch.no_grad():
                probs, _ = predict_probabilities(model.eval(), item["image"][None], item["label"].shape)
            row.append(palette[probs.argmax(1)[0].numpy().astype(np.uint8)])
        tiles.append(np.concatenate(row, axis=1))
    Image.fromarray(np.concatenate(tiles, axis=0)).save(out)
