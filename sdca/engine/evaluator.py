"""Evaluation over a whole labelled split: confusion matrix, per-class IoU, mIoU (also over subsets), PDD."""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data import collate, has_images, trainid_to_labelid, write_png
from ..data.transforms import resize_image
from ..method import SemanticDistribution, downsample_labels
from ..metrics import ConfusionMatrix, PixelDiscrimination
from ..models import upsample_logits
from .distributed import DistInfo


def standard_subsets(num_classes: int) -> Optional[Dict[str, Sequence[int]]]:
    """The named class subsets a standard label space reports (tail classes, SYNTHIA's 13); None otherwise."""
    from ..data.labels import label_space_for

    try:
        return dict(label_space_for(num_classes).subsets)
    except ValueError:
        return None


@torch.no_grad()
def predict_probabilities(model, image: torch.Tensor, out_size, size=None, scales: Sequence[float] = (1.0,),
                          flip: bool = False, resize: str = "bilinear"):
    """Softmax probabilities [B, K, H, W] at ``out_size``, averaged over scales (and flips).

    ``image``: float RGB in [0, 1]; ``size`` = (width, height) the input is resized to at scale 1 (None: as
    given), with the ``resize`` kernel. Logits are upsampled bilinearly with align_corners=True, as the public
    test script does.
    """
    normalize = model.info.normalization
    h0, w0 = image.shape[-2:]
    base_w, base_h = (size[0], size[1]) if size is not None else (w0, h0)
    total, features = None, None
    for s in scales:
        hw = (max(8, round(base_h * s)), max(8, round(base_w * s)))
        x = image if hw == (h0, w0) else resize_image(image, hw, resize)
        x = normalize(x)
        for flipped in ((False, True) if flip else (False,)):
            out = model(x.flip(-1) if flipped else x)
            logits = out.logits.flip(-1) if flipped else out.logits
            p = torch.softmax(upsample_logits(logits.float(), out_size), dim=1)
            total = p if total is None else total + p
            if features is None and s == 1.0 and not flipped:
                features = out.features
    return total / (len(scales) * (2 if flip else 1)), features


def evaluate(model, dataset, *, device, size=None, scales: Sequence[float] = (1.0,), flip: bool = False,
             save_dir: Optional[str] = None, labelid_png: bool = False, pdd_stats: Optional[SemanticDistribution] = None,
             subsets: Optional[Dict[str, Sequence[int]]] = None, dist_info: Optional[DistInfo] = None,
             progress: bool = True, workers: int = 0, resize: str = "bilinear", batch_size: int = 1) -> dict:
    """mIoU etc. of ``model`` on every item of ``dataset`` (labels at their own resolution).

    ``save_dir`` writes each prediction as a PNG named like the input (trainIds, or Cityscapes labelIds with
    ``labelid_png`` for the official evaluation scripts). ``pdd_stats`` adds the PDD of Eq. 25 per class,
    from stride-8 features against the statistics' class means. Under DDP every rank takes a share of the
    images and the confusion matrices are summed. ``batch_size`` > 1 needs frames of one size (a data set of one
    camera); predictions are still resized to each label's resolution.
    """
    from tqdm.auto import tqdm

    info = model.info
    dist_info = dist_info or DistInfo()
    model.eval()
    cm = ConfusionMatrix(info.num_classes, device=device)  # counted where the predictions are: no per-batch copy
    pdd = PixelDiscrimination(info.num_classes) if pdd_stats is not None else None
    indices = list(range(dist_info.rank, len(dataset), dist_info.world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate, pin_memory=getattr(device, "type", str(device)) == "cuda")
    unreadable = []
    for batch in tqdm(loader, desc="evaluate", disable=not (progress and dist_info.is_main), dynamic_ncols=True):
        unreadable += batch["skipped"]
        if not has_images(batch):  # an unreadable frame (on_error="skip"): left out and listed
            continue
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        probs, features = predict_probabilities(model, image, label.shape[-2:], size, scales, flip, resize)
        pred = probs.argmax(1)
        cm.update(pred, label)
        if pdd is not None:
            rows = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).float()
            small = downsample_labels(label, features.shape[-2:]).reshape(-1)
            pdd.update(rows, small, pdd_stats.mean.float().to(rows.device))
        if save_dir is not None:
            for one, name in zip(pred.cpu().numpy().astype(np.uint8), batch["name"]):
                write_png(os.path.join(save_dir, os.path.splitext(name)[0] + ".png"),
                          trainid_to_labelid(one) if labelid_png else one)
    if dist_info.enabled:
        import torch.distributed as dist

        cm.all_reduce()
        shards = [None] * dist_info.world_size
        dist.all_gather_object(shards, unreadable)  # the names each rank's shard left out
        unreadable = [name for shard in shards for name in shard]
        if pdd is not None:
            pdd.all_reduce()
    summary = cm.summary(info.class_names, subsets)
    summary["images"] = len(dataset) - len(unreadable)
    if unreadable:
        summary["unreadable"] = sorted(unreadable)
    if pdd is not None:
        summary["PDD"] = {n: (None if np.isnan(v) else v) for n, v in zip(info.class_names, pdd.value().tolist())}
    return summary


def format_table(summary: dict) -> str:
    """The per-class IoU table and the means, for printing."""
    rows = [f"{'class':<16} {'IoU':>7}" + ("   PDD" if "PDD" in summary else "")]
    for name, iou in summary["IoU"].items():
        cell = "    n/a" if iou is None else f"{100 * iou:7.2f}"
        if "PDD" in summary:
            p = summary["PDD"].get(name)
            cell += "    n/a" if p is None else f" {p:6.3f}"
        rows.append(f"{name:<16} {cell}")
    def pct(v):
        return "    n/a" if v is None else f"{100 * v:7.2f}"
    rows.append(f"{'mIoU':<16} {pct(summary['mIoU'])}")
    for key, value in summary.items():
        if key.startswith("mIoU_"):
            rows.append(f"{key:<16} {pct(value)}")
    return "\n".join(rows)


def checkpoint_feature_statistics(checkpoint: str, trusted: bool = False) -> SemanticDistribution:
    """The source feature statistics a checkpoint holds (init-stats, adapt), which the PDD needs."""
    from ..models import read_checkpoint

    raw = read_checkpoint(checkpoint, trusted=trusted)
    state = (raw.get("statistics") or {}).get("features") if isinstance(raw, dict) else None
    if not state:
        raise ValueError(f"{checkpoint} holds no feature statistics, which --pdd needs "
                         "(use a checkpoint from init-stats or adapt)")
    return SemanticDistribution.from_state_dict(state)
