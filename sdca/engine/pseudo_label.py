"""Eq. 19: class-wise median confidence thresholds over the whole target set, then label maps."""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from .._atomic import atomic_write_text
from ..data import collate, has_images, write_png
from ..method import StreamingClassMedian, pseudo_labels
from .evaluator import predict_probabilities

IGNORE = 255


@torch.no_grad()
def generate_pseudo_labels(model, dataset, out_dir: str, *, device, size=None, cap: Optional[float] = 0.9,
                           progress: bool = True, workers: int = 0, resize: str = "bilinear") -> dict:
    """Label PNGs for every image of ``dataset`` in ``out_dir`` (mirroring its names) and ``thresholds.json``.

    Three passes over the data, none of which keeps more than one image in memory: two for the exact
    per-class median of the max-softmax confidence over pixels predicted as each class (capped at ``cap``,
    as the public code; a class never predicted gets 0), one to write 'P'-mode PNGs of class ids with 255
    where the confidence is below its class's threshold. Predictions are made at ``size`` and upsampled to
    each image's own resolution.
    """
    from tqdm.auto import tqdm

    info = model.info
    model.eval()
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=collate)

    unreadable = set()

    def passes(desc):
        # An unreadable frame comes as a batch without images: skipped in every pass, so each readable frame
        # enters the medians exactly once and no label map is written for it.
        for batch in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
            unreadable.update(batch["skipped"])
            if not has_images(batch):
                continue
            image = batch["image"].to(device)
            probs, _ = predict_probabilities(model, image, image.shape[-2:], size, resize=resize)
            yield batch, probs

    median = StreamingClassMedian(info.num_classes, device=device)
    images = 0
    for _, probs in passes("pseudo-label 1/3 (histogram)"):
        images += 1
        conf, pred = probs.max(1)
        median.first_pass(conf, pred)
    for _, probs in passes("pseudo-label 2/3 (medians)"):
        conf, pred = probs.max(1)
        median.second_pass(conf, pred)
    thresholds = median.thresholds(cap=cap).cpu()
    kept = torch.zeros(info.num_classes, dtype=torch.int64)
    total = 0
    for batch, probs in passes("pseudo-label 3/3 (write)"):
        labels = pseudo_labels(probs, thresholds.to(probs.device), probabilities=True)[0].cpu()
        total += labels.numel()
        kept += torch.bincount(labels[labels != IGNORE].long(), minlength=info.num_classes)
        name = os.path.splitext(batch["name"][0])[0] + ".png"
        write_png(os.path.join(out_dir, name), labels.numpy().astype(np.uint8), palette=info.palette)
    report = {
        "images": images,
        "cap": cap,
        "thresholds": dict(zip(info.class_names, thresholds.tolist())),
        "predicted_pixels": dict(zip(info.class_names, median.counts().cpu().tolist())),
        "pixel_share": dict(zip(info.class_names, (kept.double() / max(total, 1)).tolist())),
        "ignored_share": 1.0 - float(kept.sum()) / max(total, 1),
        "unreadable": sorted(unreadable),
    }
    atomic_write_text(os.path.join(out_dir, "thresholds.json"), json.dumps(report, indent=2))
    return report
