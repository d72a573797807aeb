"""The configuration: one dataclass tree, YAML presets shipped with the package, ``a.b=c`` overrides.

Defaults live here only; the CLI and the Python API both read them. Unknown keys are rejected with the
nearest valid name, values are type-checked before any work starts, and the resolved tree is saved beside
every run.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, List, Literal, Optional

import yaml

from ..data.kinds import DATASET_KINDS
from .stages import DEFAULT_STAGES, STAGE_NAMES, TRAINED_STAGE_KEYS
from .stages import OPTIONAL_STAGES as OPTIONAL_STAGE_NAMES

ADAPT_BN_MODES = ("frozen", "train", "target")
BN_MODES = ("frozen", "train", "sync")
VARIANTS = ("paper", "reference")
RESIZE_MODES = ("bilinear", "bicubic")
SAMPLING_MODES = ("uniform", "class_balanced", "rare_class")
SCALE_BASES = ("size", "raw")
PIPELINES = ("auto", "float", "uint8")
# The default pipeline and the stages never in it (AdaBN, the mean teacher): defined once, in stages.py.
STAGES, OPTIONAL_STAGES = DEFAULT_STAGES, OPTIONAL_STAGE_NAMES
OPTIMIZERS = ("sgd", "adamw")
CONTRAST_FEATURES = ("none", "backbone", "projection")


@dataclass
class DatasetConfig:
    """One data set. kind: gta5 | synthia | cityscapes | crosscity | folder (images + labels + mapping YAML) |
    images (unlabelled folder) | synthdrive (the embedded generator; root = its cache folder)."""

    kind: Literal[DATASET_KINDS] = "images"
    root: str = ""
    split: str = "train"
    list_file: Optional[str] = None
    labels: Optional[str] = None  # folder kind: the label folder
    mapping: Optional[str] = None  # folder kind: the YAML mapping
    city: Optional[str] = None  # crosscity kind
    domain: Literal["sim", "real"] = "sim"  # synthdrive kind
    num_frames: int = 0  # synthdrive kind
    frame_size: List[int] = field(default_factory=lambda: [512, 256])  # synthdrive kind: (width, height)
    labelled: bool = True  # cityscapes kind: False for the unlabelled target set


@dataclass
class StageData:
    """One training stage's data. Every field left empty (null) takes the data-wide setting below it in
    DataConfig, which is how the default and SynthDrive set-ups keep one policy for all stages; the paper
    presets spell each stage out from the public recipe (``sdca train PRESET --print-recipe`` shows the result).
    Batch sizes are per process: the global batch is this times the number of processes."""

    batch_size: Optional[int] = None  # the stage's domain (source warm-up: source; self-train: target; adapt: both)
    target_batch_size: Optional[int] = None  # adapt only: the target batch, when it differs from the source's
    jitter: Optional[bool] = None  # colour jitter (.5, .5, .5, .2), always applied
    grayscale: Optional[float] = None  # probability of grayscale
    blur: Optional[bool] = None  # 3x3 Gaussian blur, always applied
    flip: Optional[bool] = None  # horizontal flip, p 0.5
    scale: Optional[List[float]] = None  # random scale range [low, high]
    scale_base: Optional[Literal[SCALE_BASES]] = None  # size: scale after resizing to the stage's input size | raw: the file's own size
    crop: Optional[List[int]] = None  # random crop (width, height), padded with ignore if needed
    # source images: uniform | class_balanced (FADA's rule) | rare_class (DAFormer's rule); see sdca/data/sampling.py
    sampling: Optional[Literal[SAMPLING_MODES]] = None
    rare_class_temperature: Optional[float] = None  # rare_class: T of softmax((1 - f) / T); empty: 0.01
    rare_class_min_pixels: Optional[int] = None  # rare_class: an image is drawn for c if it has more; empty: 3000


@dataclass
class StagesData:
    source: StageData = field(default_factory=StageData)  # source warm-up
    adapt: StageData = field(default_factory=StageData)  # its augmentation applies to source images only
    self_train: StageData = field(default_factory=StageData)
    # mean-teacher: the source images get this stage's augmentation, the target images its geometric part only
    # (the weak view); both must come out at one size, since class mixing pastes one onto the other.
    mean_teacher: StageData = field(default_factory=StageData)


@dataclass
class DataConfig:
    source: DatasetConfig = field(default_factory=lambda: DatasetConfig(kind="gta5"))
    target: DatasetConfig = field(default_factory=lambda: DatasetConfig(kind="cityscapes", labelled=False))
    val: Optional[DatasetConfig] = None
    source_size: List[int] = field(default_factory=lambda: [1280, 720])  # (width, height)
    target_size: List[int] = field(default_factory=lambda: [1024, 512])
    source_jitter: bool = True  # the public source policy: colour jitter, grayscale 0.2, 3x3 blur
    source_grayscale: float = 0.2
    source_blur: bool = True
    self_train_scale: List[float] = field(default_factory=lambda: [0.5, 1.5])
    self_train_crop: Optional[List[int]] = None  # (width, height); None: the target size
    batch_size: int = 1  # per domain, per process (the default of every stage's batch_size)
    # Loader processes per stream; None: sized from the CPUs per GPU on CUDA (builders.auto_workers), 2 elsewhere.
    workers: Optional[int] = None
    # auto: uint8 on CUDA (resize in uint8, photometric augmentation on the device), float elsewhere | float | uint8
    pipeline: Literal[PIPELINES] = "auto"
    on_corrupt: Literal["skip", "raise"] = "skip"  # frames (or labels) that cannot be read: skip (counted, listed) | raise
    resize: Literal[RESIZE_MODES] = "bilinear"  # image resizing kernel everywhere (train, evaluation, pseudo-labels): bilinear | bicubic
    stages: StagesData = field(default_factory=StagesData)


@dataclass
class ModelConfig:
    arch: str = "deeplabv2_resnet101"
    num_classes: int = 19
    bn: Literal[BN_MODES] = "frozen"
    # ImageNet weights: a local torchvision file (ResNet, VGG-16) or "imagenet" (Lite0: shipped in a package);
    # None with no_pretrained. Lite0 defaults to "imagenet".
    pretrained: Optional[str] = None
    no_pretrained: bool = False
    width: int = 16  # deeplabv2_small only
    output_stride: Optional[int] = None  # deeplabv2_lite0 only: 16 (default) or 8


@dataclass
class StageSolver:
    iters: int = 1000
    lr: float = 2.5e-4
    schedule_iters: Optional[int] = None  # poly schedule length (the public code stops early): None = iters
    # The global batch (per domain) the lr was set for; a run whose processes x batch differ is warned.
    global_batch: Optional[int] = None
    optimizer: Literal[OPTIMIZERS] = "sgd"  # sgd (momentum, solver.weight_decay) | adamw (betas, weight_decay below)
    weight_decay: Optional[float] = None  # None: solver.weight_decay
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    power: Optional[float] = None  # poly power; None: solver.power
    warmup_iters: int = 0  # linear warm-up of the lr over this many steps (mmcv's rule, from warmup_ratio x lr)
    warmup_ratio: float = 1e-6


@dataclass
class SolverConfig:
    momentum: float = 0.9
    weight_decay: float = 5e-4
    head_lr_mult: float = 10.0
    power: float = 0.9
    source: StageSolver = field(default_factory=lambda: StageSolver(iters=20000, lr=5e-4, schedule_iters=31250))
    adapt: StageSolver = field(default_factory=lambda: StageSolver(iters=40000, lr=2.5e-4, schedule_iters=62500))
    self_train: StageSolver = field(default_factory=lambda: StageSolver(iters=20000, lr=5e-4))
    # SePiCo's (DAFormer's) optimiser: AdamW 6e-5, weight decay 0.01, poly power 1 after 1,500 warm-up steps.
    mean_teacher: StageSolver = field(default_factory=lambda: StageSolver(
        iters=40000, lr=6e-5, optimizer="adamw", weight_decay=0.01, power=1.0, warmup_iters=1500))
    # Which checkpoint of a stage the next one starts from: final (the default: no split is looked at) | best
    # (the best val mIoU; with Cityscapes val as val that is the public script's selection on the reported split).
    select: Literal["final", "best"] = "final"
    checkpoint_period: int = 1000
    log_period: int = 20
    eval_period: int = 0  # 0: evaluate the val set only at the end of a stage


@dataclass
class MeanTeacherConfig:
    """The one-stage mean-teacher adaptation (stage mean-teacher; the facts of SePiCo's recipe in
    docs/reference/sepico_recipe.md)."""

    alpha: float = 0.999  # EMA: teacher <- a_t teacher + (1 - a_t) student, a_t = min(1 - 1/(t + 1), alpha)
    threshold: float = 0.968  # pseudo-weight: the share of target pixels whose teacher confidence is at least this
    ignore_top: int = 0  # rows (of the target input) whose pseudo-weight is 0: SePiCo's Cityscapes 15 ...
    ignore_bottom: int = 0  # ... and 120 (ego vehicle, rectification borders)
    class_mix: bool = True  # ClassMix of source onto target; false: the pseudo-labelled target image alone
    strong_augment: bool = True  # DACS's colour jitter and blur of the mixed image
    lambda_lov: float = 0.0  # Lovasz-Softmax on the source batch (SePiCo: none)
    # SDCA's loss in the stage: none | backbone (on the backbone features) | projection (a training-only head)
    contrast: Literal[CONTRAST_FEATURES] = "projection"
    lambda_contrast: float = 1.0
    tau: float = 100.0  # SePiCo's contrast_temp
    variant: Literal[VARIANTS] = "paper"  # paper | reference (the public SDCA code's normalisations); diagonal variances
    contrast_start: int = 0  # steps before the contrastive term starts (SePiCo: 3,000 of 40,000)
    projection_dim: int = 512
    projection_hidden: int = 0  # 0: the backbone's width (SePiCo: 2048 -> 2048 -> 512)
    label_ratio: float = 0.75  # a feature pixel takes its block's majority class if it covers this share


@dataclass
class MethodConfig:
    variant: Literal[VARIANTS] = "paper"  # paper | reference (the public code's formula, to reproduce published numbers)
    covariance: Literal["full", "diag"] = "full"  # full | diag
    tau: float = 0.1
    delta: float = 0.9  # Eq. 5 target confidence threshold
    class_balanced_mask: bool = False  # Eq. 5 with per-class thresholds min(delta, batch median) (see target_mask)
    lambda_lov: float = 0.75
    lambda_feat: float = 1.0
    lambda_out: float = 1.0
    multi_level: bool = True  # the output-level loss L_out
    threshold_cap: float = 0.9  # Eq. 19 thresholds are capped here, as in the public code
    self_train_from_imagenet: bool = False  # the public script restarts self-training from ImageNet weights
    self_train_bn: Optional[Literal[BN_MODES]] = None  # batch norm while self-training: frozen | train | sync; None: model.bn
    # Batch norm during adaptation: frozen (source statistics, not trained) | train (trained; running statistics
    # from both domains' batches) | target (trained; each domain normalised by its own batch statistics, running
    # statistics from target batches only, so inference uses target statistics). Was method.adapt_bn, a name
    # that read like the adapt-bn stage (AdaBN); the old key is still read.
    adaptation_bn: Literal[ADAPT_BN_MODES] = "frozen"
    mean_teacher: MeanTeacherConfig = field(default_factory=MeanTeacherConfig)

    @property
    def adapt_bn(self) -> str:
        """The old name of ``adaptation_bn``."""
        return self.adaptation_bn


@dataclass
class EvalConfig:
    size: Optional[List[int]] = None  # (width, height) the input is resized to; None: the target size
    flip: bool = False
    scales: List[float] = field(default_factory=lambda: [1.0])
    pdd: bool = False
    batch_size: int = 1  # frames per forward (frames of one batch must share a size, as a data set's do)


@dataclass
class SpeedConfig:
    cudnn_benchmark: bool = True  # CUDA: let cuDNN pick the fastest kernels (every training stage has fixed shapes)
    channels_last: bool = False  # model and inputs in channels-last memory format


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Optional[Literal["fp16", "bf16"]] = None
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.name)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


# ------------------------------------------------------------------------------------------ conversion
def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _convert(value: Any, tp, key: str):
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be empty")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    origin = typing.get_origin(tp)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def _unknown(key: str, name: str, valid) -> ConfigError:
    close = difflib.get_close_matches(name, list(valid), n=1)
    hint = f"; did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (valid here: {', '.join(sorted(valid))})")


# Keys renamed since they were first written: {class: {old: new}}. Configs saved beside older runs still load.
RENAMED_KEYS = {MethodConfig: {"adapt_bn": "adaptation_bn"}}


def _from_dict(cls, data: dict, prefix: str = ""):
    fields = _fields(cls)
    kwargs = {}
    for name, value in data.items():
        new = RENAMED_KEYS.get(cls, {}).get(name)
        if new is not None:
            old_key, name = f"{prefix}.{name}" if prefix else name, new
            if name in data:
                raise ConfigError(f"{old_key} is the old name of {prefix}.{name}: give one of them")
            warnings.warn(f"config key {old_key} is now {prefix}.{name}; the old name still works", FutureWarning,
                          stacklevel=2)
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            raise _unknown(key, name, fields)
        kwargs[name] = _convert(value, fields[name], key)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# -------------------------------------------------------------------------------------------- presets
def presets() -> List[str]:
    return sorted(p.name[:-5] for p in resources.files("sdca.engine.presets").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str) -> dict:
    if os.path.isfile(source):
        path, text = source, Path(source).read_text()
    elif source in presets():
        path, text = f"preset {source}", resources.files("sdca.engine.presets").joinpath(source + ".yaml").read_text()
    else:
        raise ConfigError(f"{source!r} is neither a config file nor a preset (presets: {', '.join(presets())})")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("base", None)  # a preset may build on another
    return _merge(_read_yaml(base), data) if base else data


def parse_override(text: str) -> dict:
    """``a.b=c`` -> {'a': {'b': c}} with c parsed as YAML (so 3, 0.5, true, [1, 2], null work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. solver.adapt.iters=100")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(source: Optional[str] = None, overrides: Optional[List[str]] = None, **direct) -> Config:
    """Defaults <- preset or YAML file <- ``direct`` (nested dicts) <- ``a.b=c`` overrides, then validated."""
    data: dict = _read_yaml(source) if source else {}
    data = _merge(data, direct)
    for text in overrides or []:
        data = _merge(data, parse_override(text))
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """What the types cannot say (choices are Literal types, which _convert checks with the key's name)."""
    from ..models.registry import ARCHS

    def check(ok: bool, key: str, message: str):
        if not ok:
            raise ConfigError(f"{key}: {message}")

    check(cfg.model.arch in ARCHS, "model.arch", f"must be one of {', '.join(ARCHS)}, got {cfg.model.arch!r}")
    check(cfg.model.num_classes >= 2, "model.num_classes", "must be at least 2")
    check(not (cfg.method.variant == "reference" and cfg.method.covariance == "full"), "method.covariance",
          "the reference variant keeps diagonal variances, as the public code; use diag")
    check(cfg.method.tau > 0, "method.tau", "must be positive")
    check(0 <= cfg.method.delta <= 1, "method.delta", "must lie in [0, 1]")
    check(cfg.data.batch_size >= 1, "data.batch_size", "must be at least 1")
    check(cfg.data.workers is None or cfg.data.workers >= 0, "data.workers", "must be at least 0 (or empty: auto)")
    check(cfg.eval.batch_size >= 1, "eval.batch_size", "must be at least 1")
    for stage in TRAINED_STAGE_KEYS:
        sd, key = getattr(cfg.data.stages, stage), f"data.stages.{stage}"
        for name in ("batch_size", "target_batch_size"):
            value = getattr(sd, name)
            check(value is None or value >= 1, f"{key}.{name}", "must be at least 1")
        check(sd.grayscale is None or 0 <= sd.grayscale <= 1, f"{key}.grayscale", "must lie in [0, 1]")
        check(sd.scale is None or (len(sd.scale) == 2 and 0 < sd.scale[0] <= sd.scale[1]), f"{key}.scale",
              "must be [low, high] with 0 < low <= high")
        check(sd.crop is None or (len(sd.crop) == 2 and all(c > 0 for c in sd.crop)), f"{key}.crop",
              "must be [width, height]")
        check(sd.rare_class_temperature is None or sd.rare_class_temperature > 0, f"{key}.rare_class_temperature",
              "must be positive")
        check(sd.rare_class_min_pixels is None or sd.rare_class_min_pixels >= 0, f"{key}.rare_class_min_pixels",
              "must be at least 0")
    check(cfg.data.stages.self_train.sampling in (None, "uniform"), "data.stages.self_train.sampling",
          "class-balanced sampling needs labels: the self-training images are the target's")
    for key in ("source_size", "target_size"):
        size = getattr(cfg.data, key)
        check(len(size) == 2 and all(s > 0 for s in size), f"data.{key}", "must be [width, height]")
    unknown = [s for s in cfg.stages if s not in STAGE_NAMES]
    check(not unknown, "stages", f"unknown stage {unknown[0] if unknown else ''}; stages: {', '.join(STAGE_NAMES)}")
    for stage in TRAINED_STAGE_KEYS:
        s = getattr(cfg.solver, stage)
        check(s.iters >= 0, f"solver.{stage}.iters", "must be at least 0")
        check(s.lr > 0, f"solver.{stage}.lr", "must be positive")
        check(len(s.betas) == 2 and all(0 <= b < 1 for b in s.betas), f"solver.{stage}.betas",
              "must be [beta1, beta2] in [0, 1)")
        check(s.warmup_iters >= 0, f"solver.{stage}.warmup_iters", "must be at least 0")
        check(0 < s.warmup_ratio <= 1, f"solver.{stage}.warmup_ratio", "must lie in (0, 1]")
    mt, key = cfg.method.mean_teacher, "method.mean_teacher"
    check(0 <= mt.alpha < 1, f"{key}.alpha", "must lie in [0, 1)")
    check(0 <= mt.threshold <= 1, f"{key}.threshold", "must lie in [0, 1]")
    check(mt.ignore_top >= 0 and mt.ignore_bottom >= 0, f"{key}.ignore_top", "ignored rows must be at least 0")
    check(mt.tau > 0, f"{key}.tau", "must be positive")
    check(mt.projection_dim >= 1 and mt.projection_hidden >= 0, f"{key}.projection_dim", "must be at least 1")
    check(0 < mt.label_ratio <= 1, f"{key}.label_ratio", "must lie in (0, 1]")


def save_config(cfg: Config, path: str) -> None:
    from .._atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
