"""The recipe a config resolves to, stage by stage: what data each training stage sees, and a printable table.

``data.stages.<stage>`` fields left empty take the data-wide settings (``data.batch_size``, ``data.source_*``,
``data.self_train_*``), so one-policy configs (the default preset, SynthDrive) need nothing here; the paper
presets spell every stage out from the public recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..data import build_transform
from .config import Config, ConfigError

TRAINING_STAGES = ("source", "adapt", "self_train", "mean_teacher")


@dataclass(frozen=True)
class StageRecipe:
    """One training stage's data, every value resolved (batch sizes per process)."""

    batch_size: int
    target_batch_size: int  # adapt: the target batch; elsewhere equal to batch_size
    jitter: bool
    grayscale: float
    blur: bool
    flip: bool
    scale: Optional[Tuple[float, float]]
    scale_base: str
    crop: Optional[Tuple[int, int]]
    sampling: str
    rare_class_temperature: float = 0.01
    rare_class_min_pixels: int = 3000


def stage_data(cfg: Config, stage: str) -> StageRecipe:
    """``stage``: source | adapt | self_train (self-train's images are the target's) | mean_teacher."""
    if stage not in TRAINING_STAGES:
        raise ValueError(f"stage must be one of {', '.join(TRAINING_STAGES)}, got {stage!r}")
    d = cfg.data
    given = getattr(d.stages, stage)
    fallback = dict(batch_size=d.batch_size, jitter=d.source_jitter, grayscale=d.source_grayscale,
                    blur=d.source_blur, flip=False, scale=None, scale_base="size", crop=None, sampling="uniform")
    if stage == "self_train":
        fallback.update(flip=True, scale=list(d.self_train_scale), crop=list(d.self_train_crop or d.target_size))
    values = {k: (getattr(given, k) if getattr(given, k) is not None else v) for k, v in fallback.items()}
    if values["scale_base"] == "raw" and values["crop"] is None:
        raise ConfigError(f"data.stages.{stage}: scale_base raw keeps each file's own size, so a crop is needed "
                          "to batch the images")
    return StageRecipe(batch_size=values["batch_size"],
                     target_batch_size=given.target_batch_size or values["batch_size"],
                     jitter=values["jitter"], grayscale=float(values["grayscale"]), blur=values["blur"],
                     flip=values["flip"], scale=tuple(values["scale"]) if values["scale"] else None,
                     scale_base=values["scale_base"], crop=tuple(values["crop"]) if values["crop"] else None,
                     sampling=values["sampling"],
                     rare_class_temperature=given.rare_class_temperature or 0.01,
                     rare_class_min_pixels=3000 if given.rare_class_min_pixels is None else given.rare_class_min_pixels)


def stage_transform(cfg: Config, stage: str, domain: str = "source", uint8: bool = False):
    """The transform of ``stage``'s images of ``domain`` (adapt's target images are only resized, as the public
    code's; self-train's target images get the self-train stage's augmentation). ``uint8``: the pipeline that
    feeds a GPU (see :mod:`sdca.data.transforms`)."""
    r = stage_data(cfg, stage)
    resize = cfg.data.resize
    if stage == "adapt" and domain == "target":
        return build_transform(size=cfg.data.target_size, resize=resize, uint8=uint8)
    if stage == "mean_teacher" and domain == "target":  # the weak view: the stage's geometry, no photometric change
        return build_transform(size=None if r.scale_base == "raw" else cfg.data.target_size, scale=r.scale,
                               crop=r.crop, flip=r.flip, resize=resize, uint8=uint8)
    size = cfg.data.target_size if stage == "self_train" else cfg.data.source_size
    return build_transform(size=None if r.scale_base == "raw" else size, scale=r.scale, crop=r.crop, flip=r.flip,
                           jitter=r.jitter, grayscale=r.grayscale, blur=r.blur, resize=resize, uint8=uint8)


def _bn(cfg: Config, stage: str) -> str:
    if cfg.model.arch == "deeplabv2_vgg16":
        return "none (VGG-16)"
    if stage == "adapt":
        return {"frozen": "frozen", "train": "trained", "target": "trained, target statistics"}[cfg.method.adaptation_bn]
    if stage == "mean_teacher":
        if cfg.model.bn == "frozen":
            return "frozen (teacher too)"
        return {"train": "trained", "sync": "trained, synced"}[cfg.model.bn] + " (teacher: batch statistics)"
    mode = cfg.method.self_train_bn or cfg.model.bn if stage == "self_train" else cfg.model.bn
    return {"frozen": "frozen", "train": "trained", "sync": "trained, synced"}[mode]


def _optimizer(cfg: Config, solver) -> str:
    wd = cfg.solver.weight_decay if solver.weight_decay is None else solver.weight_decay
    power = cfg.solver.power if solver.power is None else solver.power
    name = (f"AdamW {tuple(solver.betas)}" if solver.optimizer == "adamw" else f"SGD m {cfg.solver.momentum:g}")
    warm = f", warm-up {solver.warmup_iters}" if solver.warmup_iters else ""
    return f"{name}, wd {wd:g}, head x{cfg.solver.head_lr_mult:g}, poly {power:g}{warm}"


def _augmentation(r: StageRecipe, geometric: bool = False) -> str:
    parts = []
    if r.scale:
        parts.append(f"scale U({r.scale[0]:g}, {r.scale[1]:g}) of the {'raw image' if r.scale_base == 'raw' else 'resized image'}")
    if r.crop:
        parts.append(f"crop {r.crop[0]}x{r.crop[1]}")
    if r.flip:
        parts.append("flip")
    if geometric:
        return ", ".join(parts) or "none"
    if r.jitter:
        parts.append("jitter")
    if r.grayscale:
        parts.append(f"grayscale {r.grayscale:g}")
    if r.blur:
        parts.append("blur")
    return ", ".join(parts) or "none"


def recipe_rows(cfg: Config, world_size: int = 1) -> List[dict]:
    """One row per training stage, every value resolved, for ``sdca train --print-recipe``."""
    rows = []
    src, tgt = cfg.data.source_size, cfg.data.target_size
    selection = "best val mIoU" if cfg.solver.select == "best" else "final weights"
    stages = [("source", cfg.solver.source, "source"), ("adapt", cfg.solver.adapt, "adapt"),
              ("self_train", cfg.solver.self_train, "self-train")]
    if "mean-teacher" in cfg.stages:  # the one-stage recipe replaces the paper's stages unless those are listed too
        stages = [s for s in stages if s[0] == "source" or s[2] in cfg.stages]
        stages.append(("mean_teacher", cfg.solver.mean_teacher, "mean-teacher"))
    for stage, solver, label in stages:
        r = stage_data(cfg, stage)
        if stage == "mean_teacher":
            mt = cfg.method.mean_teacher
            batch = f"{r.batch_size} + {r.batch_size}"
            global_batch = f"{r.batch_size * world_size} + {r.batch_size * world_size}"
            inputs = f"source {src[0]}x{src[1]}, target {tgt[0]}x{tgt[1]}"
            mixed = ("ClassMix" if mt.class_mix else "target only") + (", strong" if mt.strong_augment else "")
            augmentation = f"source: {_augmentation(r)}; target: {_augmentation(r, geometric=True)}; mixed: {mixed}"
        elif stage == "adapt":
            batch = f"{r.batch_size} + {r.target_batch_size}"
            global_batch = f"{r.batch_size * world_size} + {r.target_batch_size * world_size}"
            inputs = f"source {src[0]}x{src[1]}, target {tgt[0]}x{tgt[1]}"
            augmentation = f"source: {_augmentation(r)}; target: none"
        else:
            batch, global_batch = str(r.batch_size), str(r.batch_size * world_size)
            size = src if stage == "source" else tgt
            inputs = (f"{'source' if stage == 'source' else 'target'} "
                      + ("raw size" if r.scale_base == "raw" else f"{size[0]}x{size[1]}"))
            augmentation = _augmentation(r)
        start = {"source": "ImageNet" if not cfg.model.no_pretrained else "scratch",
                 "adapt": f"source ({selection})", "mean_teacher": f"source ({selection})",
                 "self_train": "ImageNet" if cfg.method.self_train_from_imagenet else f"adapt ({selection})"}[stage]
        rows.append({"stage": label, "lr": solver.lr, "iters": solver.iters,
                     "poly length": solver.schedule_iters or solver.iters,
                     "batch / process": batch, f"global batch ({world_size} proc.)": global_batch,
                     "global batch of the lr": solver.global_batch or "not set",
                     "optimizer": _optimizer(cfg, solver),
                     "batch norm": _bn(cfg, stage), "input": inputs, "resize": cfg.data.resize,
                     "augmentation": augmentation,
                     "sampling": r.sampling if stage != "self_train" else "uniform (target)", "starts from": start})
    return rows


def batch_mismatch(cfg: Config, stage: str, world_size: int) -> Optional[str]:
    """A warning when ``world_size`` x the stage's per-process batch is not the global batch its lr was set for
    (``solver.<stage>.global_batch``); None when they agree or none is set."""
    solver = getattr(cfg.solver, stage)
    batch = stage_data(cfg, stage).batch_size
    if not solver.global_batch or batch * world_size == solver.global_batch:
        return None
    return (f"stage {stage.replace('_', '-')}: {world_size} process{'es' if world_size != 1 else ''} x batch {batch} "
            f"= global batch {batch * world_size}, but its lr {solver.lr:g} is set for a global batch of "
            f"{solver.global_batch}: set data.stages.{stage}.batch_size={max(1, solver.global_batch // world_size)} "
            f"(or scale solver.{stage}.lr) to train the recipe as written")


def format_recipe(cfg: Config, world_size: int = 1) -> str:
    """The resolved recipe as a table: one row per setting, one column per training stage."""
    rows = recipe_rows(cfg, world_size)
    keys = [k for k in rows[0] if k != "stage"]
    width = max(len(k) for k in keys)
    cols = [max(len(str(r["stage"])), *(len(str(r[k])) for k in keys)) for r in rows]
    lines = [f"recipe of {cfg.name} at {world_size} process{'es' if world_size != 1 else ''}",
             (" " * width + "  " + "  ".join(f"{r['stage']:<{c}}" for r, c in zip(rows, cols))).rstrip()]
    for key in keys:
        lines.append(f"{key:<{width}}  " + "  ".join(f"{str(r[key]):<{c}}" for r, c in zip(rows, cols)).rstrip())
    return "\n".join(lines)
