"""`sdca inspect`: is adaptation working? Read off a checkpoint, source frames and (unlabelled) target frames.

Per class: the share of target pixels predicted vs the source label share (and their KL divergence), mean
confidence and entropy, the share passing the Eq. 5 mask and the Eq. 19 thresholds. Alignment: the mean
log-likelihood and Mahalanobis distance of target features (by predicted class) under the checkpoint's source
Gaussians, beside the same for source features (by label) -- the gap SDCA is meant to close -- and PDD (Eq. 25).
With target labels: precision and recall of the Eq. 5 mask and of the Eq. 19 pseudo-labels, the confusion
matrix. A 2-D map (PCA, or t-SNE on request) of sampled pixel features of both domains. A bounded number of
frames: this is a look, not an evaluation.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from .._atomic import atomic_write_text
from ..data import ImageFolder, build_transform, collate, has_images
from ..method import SemanticDistribution, downsample_labels
from ..method.diagnostics import class_shares, entropy, gaussian_scores, kl_divergence, masked_precision_recall
from ..method.masks import class_median_thresholds
from ..metrics import PixelDiscrimination
from ..models import read_checkpoint, upsample_logits
from ..models.checkpoint import model_from_checkpoint
from . import markdown as md
from .builders import build_dataset
from .steps import pixel_rows, statistics_rows

IGNORE = 255
NEEDS_STATISTICS = ("alignment (log-likelihood, Mahalanobis distance)", "PDD (Eq. 25)")


class InspectError(ValueError):
    """Input that inspect cannot work with (named in the message)."""


def labelled_domains(cfg):
    """A training config's source set and labelled val set, each at the config's size for its domain: what the
    demo and the experiment inspect their models on."""
    k = cfg.model.num_classes
    return (build_dataset(cfg.data.source, k, build_transform(size=cfg.data.source_size)),
            build_dataset(cfg.data.val, k, build_transform(size=cfg.data.target_size)))


def _subset(dataset, frames: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(dataset))[:frames]
    return torch.utils.data.Subset(dataset, sorted(order.tolist()))


def _sample_rows(rows: torch.Tensor, labels: torch.Tensor, per_class: int, num_classes: int,
                 gen: torch.Generator, store: Dict[int, List[torch.Tensor]], counts: Dict[int, int]) -> None:
    """Keep up to ``per_class`` rows per class across calls (first come, shuffled within a frame)."""
    for k in labels.unique().tolist():
        if k == IGNORE or k >= num_classes or counts.get(k, 0) >= per_class:
            continue
        idx = (labels == k).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)[: per_class - counts.get(k, 0)]]
        store.setdefault(k, []).append(rows[idx].float().cpu())
        counts[k] = counts.get(k, 0) + idx.numel()


class _Scores:
    """Per-class sums of log-likelihood and Mahalanobis distance under the source Gaussians."""

    def __init__(self, num_classes: int):
        self.loglik = np.zeros(num_classes)
        self.distance = np.zeros(num_classes)
        self.count = np.zeros(num_classes, dtype=np.int64)

    def add(self, rows, labels, stats: SemanticDistribution) -> None:
        for k in labels.unique().tolist():
            if k == IGNORE or k >= len(self.count) or int(stats.count[k]) < 2:
                continue
            x = rows[labels == k]
            cov = stats.covariance[k]
            loglik, dist = gaussian_scores(x, stats.mean[k], cov)
            self.loglik[k] += float(loglik.sum())
            self.distance[k] += float(dist.sum())
            self.count[k] += x.shape[0]

    def means(self):
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.loglik / self.count, self.distance / self.count


def _nan_list(values) -> list:
    return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else float(v) for v in values]


@dataclass
class _Context:
    """What both passes over the data share: the model, its statistics, the feature samples for the map."""
    model: torch.nn.Module
    k: int
    variant: str
    stats: Optional[SemanticDistribution]
    device: object
    frames: int
    seed: int
    per_class: int
    progress: bool
    gen: torch.Generator = field(init=False)  # the feature samples' draws, from ``seed``
    samples: Dict[str, Dict[int, List[torch.Tensor]]] = field(default_factory=lambda: {"source": {}, "target": {}})
    taken: Dict[str, Dict[int, int]] = field(default_factory=lambda: {"source": {}, "target": {}})

    def __post_init__(self):
        self.gen = torch.Generator().manual_seed(self.seed)

    def batches(self, ds, which: str):
        from tqdm.auto import tqdm

        loader = DataLoader(_subset(ds, self.frames, self.seed), batch_size=1, collate_fn=collate)
        return tqdm(loader, desc=f"inspect: {which}", disable=not self.progress)

    def forward(self, image):
        return self.model(self.model.info.normalization(image.to(self.device)))

    def rows(self, out):
        return statistics_rows(pixel_rows(out.features), self.variant)

    def sample(self, which: str, rows, labels) -> None:
        _sample_rows(rows, labels, self.per_class, self.k, self.gen, self.samples[which], self.taken[which])


@dataclass
class _SourcePass:
    counts: torch.Tensor  # labelled pixels per class
    scores: "_Scores"
    pdd: PixelDiscrimination
    frames: int


@dataclass
class _TargetPass:
    confidence: torch.Tensor  # every kept pixel's max probability
    prediction: torch.Tensor  # and its argmax
    entropy_sum: torch.Tensor  # per predicted class
    truth: Optional[torch.Tensor]  # the labels, with --target-labels
    scores: "_Scores"
    pdd: PixelDiscrimination
    frames: int


def _check_inputs(checkpoint, model, source, target, target_labels) -> None:
    k = model.num_classes
    for which, ds in (("source", source), ("target", target)):
        if len(ds) == 0:
            raise InspectError(f"the {which} data set is empty")
        space = getattr(ds, "label_space", None)
        if space is not None and len(space.class_names) != k:
            raise InspectError(f"the {which} data has {len(space.class_names)} classes but {checkpoint} predicts {k}")
    if isinstance(source, ImageFolder):
        raise InspectError("the source data must be labelled (its label shares and Gaussians need labels)")
    if target_labels and isinstance(target, ImageFolder):
        raise InspectError("--target-labels: the target data set has no labels")


def _source_pass(ctx: _Context, source) -> _SourcePass:
    """Label shares and the source side of the alignment scores."""
    k, stats = ctx.k, ctx.stats
    result = _SourcePass(torch.zeros(k, dtype=torch.float64), _Scores(k), PixelDiscrimination(k), 0)
    for batch in ctx.batches(source, "source"):
        if not has_images(batch) or "label" not in batch:
            continue
        out = ctx.forward(batch["image"])
        labels = batch["label"].to(ctx.device)
        result.counts += class_shares(labels, k) * float((labels != IGNORE).sum())
        small = downsample_labels(labels, out.features.shape[-2:]).reshape(-1)
        rows = ctx.rows(out)
        if stats is not None:
            result.scores.add(rows, small, stats)
            result.pdd.update(rows, small, stats.mean.float())
        ctx.sample("source", rows, small)
        result.frames += 1
    if result.frames == 0:
        raise InspectError("no labelled source frame could be read")
    return result


def _target_pass(ctx: _Context, target, target_labels: bool) -> _TargetPass:
    """Predictions. Confidence and prediction of every pixel are kept (a bounded number of frames): the
    per-class figures and Eq. 19's medians are read off them at the end; entropy is summed as it comes."""
    k, stats = ctx.k, ctx.stats
    ent_sum = torch.zeros(k, dtype=torch.float64)
    confidences, predictions, truths = [], [], []
    scores, pdd, n = _Scores(k), PixelDiscrimination(k), 0
    for batch in ctx.batches(target, "target"):
        if not has_images(batch):
            continue
        image = batch["image"].to(ctx.device)
        out = ctx.forward(image)
        probs = torch.softmax(upsample_logits(out.logits.float(), image.shape[-2:]), dim=1)
        conf, pred = probs.max(1)
        confidences.append(conf.reshape(-1).cpu())
        predictions.append(pred.reshape(-1).cpu())
        ent_sum.index_add_(0, predictions[-1], entropy(probs).reshape(-1).cpu())
        small_pred = out.logits.argmax(1).reshape(-1)
        rows = ctx.rows(out)
        labelled = target_labels and "label" in batch
        if labelled:
            truths.append(batch["label"].reshape(-1))
        if stats is not None:
            scores.add(rows, small_pred, stats)
            # PDD by the labels where there are some, else by the prediction (the best the target offers).
            pdd_labels = (downsample_labels(batch["label"].to(ctx.device), out.features.shape[-2:]).reshape(-1)
                          if labelled else small_pred)
            pdd.update(rows, pdd_labels, stats.mean.float())
        ctx.sample("target", rows, small_pred)
        n += 1
    if n == 0:
        raise InspectError("no target frame could be read")
    return _TargetPass(torch.cat(confidences), torch.cat(predictions), ent_sum,
                       torch.cat(truths) if truths else None, scores, pdd, n)


def _summary(src: _SourcePass, tgt: _TargetPass, k: int, delta: float, cap: float, with_stats: bool,
             target_labels: bool) -> dict:
    """The per-class figures, the alignment and, with target labels, precision / recall and the confusion."""
    conf_all, pred_all = tgt.confidence, tgt.prediction
    pred_counts = torch.bincount(pred_all, minlength=k).double()
    conf_sum = torch.zeros(k, dtype=torch.float64).index_add_(0, pred_all, conf_all.double())
    thresholds = class_median_thresholds(conf_all, pred_all, k, cap=cap)
    # Eq. 5 and Eq. 19 on the kept confidences (the rules of sdca.method.masks, which take whole probability
    # maps: these frames' maps are not kept).
    eq5_labels = torch.where(conf_all >= delta, pred_all, torch.full_like(pred_all, IGNORE))
    eq19_labels = torch.where(conf_all >= thresholds.float()[pred_all], pred_all, torch.full_like(pred_all, IGNORE))
    eq5, eq19 = (torch.bincount(lab[lab != IGNORE], minlength=k).double() for lab in (eq5_labels, eq19_labels))
    src_share = src.counts / src.counts.sum()
    tgt_share = pred_counts / pred_counts.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = {
            "source_label_share": src_share.tolist(), "target_predicted_share": tgt_share.tolist(),
            "target_mean_confidence": _nan_list((conf_sum / pred_counts).tolist()),
            "target_mean_entropy": _nan_list((tgt.entropy_sum / pred_counts).tolist()),
            "eq5_pass_share": _nan_list((eq5 / pred_counts).tolist()),
            "eq19_threshold": thresholds.tolist(), "eq19_pass_share": _nan_list((eq19 / pred_counts).tolist()),
        }
    result = {"kl_target_predicted_vs_source_labels": kl_divergence(tgt_share, src_share), "per_class": per_class}
    if with_stats:
        s_ll, s_d = src.scores.means()
        t_ll, t_d = tgt.scores.means()
        result["alignment"] = {"source_loglik": _nan_list(s_ll), "target_loglik": _nan_list(t_ll),
                               "source_mahalanobis": _nan_list(s_d), "target_mahalanobis": _nan_list(t_d),
                               "source_pdd": _nan_list(src.pdd.value().tolist()),
                               "target_pdd": _nan_list(tgt.pdd.value().tolist()),
                               "pdd_target_labels": "ground truth" if target_labels else "prediction"}
        both = [(a, b) for a, b in zip(s_d, t_d) if not (math.isnan(a) or math.isnan(b))]
        result["alignment"]["mean_mahalanobis_gap"] = (float(np.mean([b - a for a, b in both])) if both else None)
    if target_labels and tgt.truth is not None:
        truth_all = tgt.truth
        valid = truth_all != IGNORE
        confusion = torch.bincount(truth_all[valid].long() * k + pred_all[valid], minlength=k * k).reshape(k, k)
        p5, r5, _ = masked_precision_recall(eq5_labels, truth_all, k)
        p19, r19, _ = masked_precision_recall(eq19_labels, truth_all, k)
        result["with_labels"] = {"eq5_precision": _nan_list(p5.tolist()), "eq5_recall": _nan_list(r5.tolist()),
                                 "eq19_precision": _nan_list(p19.tolist()), "eq19_recall": _nan_list(r19.tolist()),
                                 "target_label_share": class_shares(truth_all, k).tolist(),
                                 "confusion": confusion.tolist()}
    return result


@torch.no_grad()
def inspect_checkpoint(checkpoint: str, source, target, out_dir: str, *, target_labels: bool = False,
                       frames: int = 50, device="cpu", feature_map: str = "pca",
                       per_class: int = 100, seed: int = 0, progress: bool = True, title: Optional[str] = None,
                       ckpt: Optional[dict] = None, trusted: bool = False) -> dict:
    """Write ``out_dir``/inspect.json, inspect.md and figures; returns the JSON's content.

    ``source``: a labelled data set (its labels give the source label shares and the source side of the
    alignment). ``target``: a data set of target frames; with ``target_labels`` its labels give precision,
    recall and the confusion matrix. Both come with their transform (the size the model runs at). ``ckpt``:
    the checkpoint already read (:func:`read_checkpoint`), so that a caller that read it is not made to again;
    ``trusted``: read ``checkpoint`` with full unpickling otherwise (see :func:`read_checkpoint`).
    Passes: the source (label shares, source-side scores), the target (predictions), the summary, the files.
    """
    ckpt = read_checkpoint(checkpoint, trusted=trusted) if ckpt is None else ckpt
    model = model_from_checkpoint(ckpt, checkpoint).to(device).eval()
    _check_inputs(checkpoint, model, source, target, target_labels)
    config = ckpt.get("config") or {} if isinstance(ckpt, dict) else {}
    method = config.get("method") or {}
    variant, delta, cap = method.get("variant", "paper"), float(method.get("delta", 0.9)), method.get(
        "threshold_cap", 0.9)
    raw_stats = (ckpt.get("statistics") or {}) if isinstance(ckpt, dict) else {}
    stats = SemanticDistribution.from_state_dict(raw_stats["features"]).to(device) if raw_stats.get("features") \
        else None
    ctx = _Context(model, model.num_classes, variant, stats, device, frames, seed, per_class, progress)
    src = _source_pass(ctx, source)
    tgt = _target_pass(ctx, target, target_labels)
    summary = _summary(src, tgt, ctx.k, delta, cap, stats is not None, target_labels)
    result = {"checkpoint": os.path.abspath(checkpoint), "title": title, "classes": list(model.info.class_names),
              "frames": {"source": src.frames, "target": tgt.frames}, "delta": delta, "threshold_cap": cap,
              "feature_space": "L2-normalised features" if variant == "paper" else "raw features",
              "kl_target_predicted_vs_source_labels": summary.pop("kl_target_predicted_vs_source_labels"),
              "per_class": summary.pop("per_class"), "skipped": [] if stats is not None else list(NEEDS_STATISTICS),
              **summary}
    os.makedirs(out_dir, exist_ok=True)
    result["figures"] = _figures(result, ctx.samples, out_dir, feature_map, seed)
    atomic_write_text(os.path.join(out_dir, "inspect.json"), json.dumps(result, indent=1))
    atomic_write_text(os.path.join(out_dir, "inspect.md"), render_markdown(result))
    return result


def _figures(result: dict, samples, out_dir: str, feature_map: str, seed: int) -> Dict[str, str]:
    """The PNG figures (matplotlib; the feature map with scikit-learn). Missing libraries: figures skipped
    and said so in the result, the numbers stay."""
    from .plots import feature_map_figure, inspect_figures

    figures = {}
    try:
        figures.update(inspect_figures(result, out_dir))
    except ImportError as exc:
        result["skipped"].append(f"figures ({exc})")
    rows, labels, domains = [], [], []
    for domain in ("source", "target"):
        for cls, chunks in samples[domain].items():
            x = torch.cat(chunks)
            rows.append(x)
            labels += [cls] * x.shape[0]
            domains += [domain] * x.shape[0]
    if rows:
        try:
            path = os.path.join(out_dir, "features.png")
            feature_map_figure(torch.cat(rows).numpy(), np.asarray(labels), np.asarray(domains), result["classes"],
                               path, method=feature_map, seed=seed)
            figures["features"] = "features.png"
        except ImportError as exc:
            result["skipped"].append(f"feature map ({exc})")
    return figures


def _fmt(v, scale=100.0, digits=1):
    return "n/a" if v is None else f"{scale * v:.{digits}f}"


def render_markdown(r: dict) -> str:
    pc = r["per_class"]
    title = r.get("title") or os.path.basename(r["checkpoint"])
    lines = [f"# sdca inspect: {title}", "",
             f"{r['frames']['source']} source and {r['frames']['target']} target frames; Eq. 5 delta {r['delta']}, "
             f"Eq. 19 thresholds: per-class median confidence capped at {r['threshold_cap']}; features in the space "
             f"of the statistics ({r['feature_space']}).", "",
             f"KL(target predicted shares || source label shares) = {r['kl_target_predicted_vs_source_labels']:.3f} "
             "nats (0: the target is predicted in the source's class proportions; large: collapse onto some "
             "classes or classes never predicted).", ""]
    if r["skipped"]:
        lines += ["Skipped: " + "; ".join(r["skipped"]) + " (the checkpoint holds no semantic statistics: a "
                  "source-only model; run init-stats for them)." if any("PDD" in s for s in r["skipped"])
                  else "Skipped: " + "; ".join(r["skipped"]) + ".", ""]
    head = ["class", "source label %", "target pred %", "conf", "entropy", "Eq.5 pass %", "Eq.19 pass %"]
    al = r.get("alignment")
    wl = r.get("with_labels")
    if al:
        head += ["Mahal. src", "Mahal. tgt", "PDD src", "PDD tgt"]
    if wl:
        head += ["target label %", "Eq.5 prec", "Eq.5 rec", "Eq.19 prec", "Eq.19 rec"]
    lines += md.header(head, "l" + "r" * (len(head) - 1))
    for i, name in enumerate(r["classes"]):
        cells = [name, _fmt(pc["source_label_share"][i]), _fmt(pc["target_predicted_share"][i]),
                 _fmt(pc["target_mean_confidence"][i], 1, 2), _fmt(pc["target_mean_entropy"][i], 1, 2),
                 _fmt(pc["eq5_pass_share"][i]), _fmt(pc["eq19_pass_share"][i])]
        if al:
            cells += [_fmt(al["source_mahalanobis"][i], 1, 1), _fmt(al["target_mahalanobis"][i], 1, 1),
                      _fmt(al["source_pdd"][i], 1, 2), _fmt(al["target_pdd"][i], 1, 2)]
        if wl:
            cells += [_fmt(wl["target_label_share"][i]), _fmt(wl["eq5_precision"][i]), _fmt(wl["eq5_recall"][i]),
                      _fmt(wl["eq19_precision"][i]), _fmt(wl["eq19_recall"][i])]
        lines.append("| " + " | ".join(cells) + " |")
    if al and al.get("mean_mahalanobis_gap") is not None:
        lines += ["", f"Alignment: target features sit on average {al['mean_mahalanobis_gap']:.1f} Mahalanobis units "
                      "further from their (predicted) class's source Gaussian than source features from their "
                      "labelled class's: the gap SDCA's loss is meant to close. PDD of the target is computed with "
                      f"the {al['pdd_target_labels']}."]
    if r.get("figures"):
        lines += [""] + [f"![{name}]({path})" for name, path in r["figures"].items()]
    return "\n".join(lines) + "\n"


def summary_numbers(r: dict) -> Dict[str, Optional[float]]:
    """One line of numbers per inspected model (for side-by-side comparisons)."""
    pc = r["per_class"]
    weights = np.asarray(pc["target_predicted_share"])

    def weighted(values):
        v = np.asarray([np.nan if x is None else x for x in values], dtype=np.float64)
        ok = ~np.isnan(v) & (weights > 0)
        return float((v[ok] * weights[ok]).sum() / weights[ok].sum()) if ok.any() else None

    out = {"kl": r["kl_target_predicted_vs_source_labels"],
           "classes_predicted": int((weights > 0.001).sum()),
           "confidence": weighted(pc["target_mean_confidence"]), "eq5_pass": weighted(pc["eq5_pass_share"]),
           "mahalanobis_gap": (r.get("alignment") or {}).get("mean_mahalanobis_gap")}
    al = r.get("alignment")
    if al:
        tgt = [v for v in al["target_pdd"] if v is not None]
        out["target_pdd"] = float(np.mean(tgt)) if tgt else None
    wl = r.get("with_labels")
    if wl:
        out["eq5_precision"] = weighted(wl["eq5_precision"])
        out["eq19_precision"] = weighted(wl["eq19_precision"])
    return out


def compare_markdown(results: Dict[str, dict], folders: Dict[str, str]) -> List[str]:
    """Markdown lines: the inspected models side by side (summary numbers, then their class-share figures)."""
    rows = {name: summary_numbers(r) for name, r in results.items()}
    fields = [("kl", "KL(target pred ‖ source labels)", 1, 3), ("classes_predicted", "classes predicted (>0.1%)", 1, 0),
              ("confidence", "mean confidence", 1, 2), ("eq5_pass", "Eq. 5 pass %", 100, 1),
              ("eq5_precision", "Eq. 5 precision %", 100, 1), ("eq19_precision", "Eq. 19 precision %", 100, 1),
              ("mahalanobis_gap", "Mahalanobis gap (target − source)", 1, 1), ("target_pdd", "target PDD", 1, 3)]
    names = list(rows)
    lines = md.header(["", *names], "l" + "r" * len(names))
    for key, label, scale, digits in fields:
        if all(rows[n].get(key) is None for n in names):
            continue
        lines.append(f"| {label} | " + " | ".join(_fmt(rows[n].get(key), scale, digits) for n in names) + " |")
    lines += ["", "Confidence, pass shares and precisions: averages over classes weighted by the predicted share. "
                  "Mahalanobis gap: mean over classes of (target features' distance to their predicted class's "
                  "source Gaussian) − (source features' to their labelled class's).", ""]
    lines += [f"![{n}]({folders[n]}/classes.png)" for n in names if "classes" in results[n].get("figures", {})]
    return lines


def read_for_inspect(checkpoint: str, trusted: bool = False):
    """(the checkpoint read, its class count, its training size or None): what the data sets are built with. A
    public release file (no model info) predicts the 19 Cityscapes classes."""
    from ..models.deeplab import ModelInfo

    try:
        ckpt = read_checkpoint(checkpoint, trusted=trusted)
        info = ModelInfo.from_dict(ckpt["model"]["info"]) if ckpt.get("format") == "sdca-checkpoint" else None
    except KeyError as exc:
        raise ValueError(f"{checkpoint}: no model information ({exc})") from None
    return ckpt, (info.num_classes if info else 19), (info.train_size if info else None)
