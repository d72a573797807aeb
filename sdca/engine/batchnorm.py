"""Batch-norm handling across domains: keep the running statistics out of a forward pass, or re-estimate them
on target images (AdaBN, Li et al. 2016), the control that tells how much of a gain is batch-norm statistics."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import collate, has_images


def _batchnorms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def running_stats_untouched(model: nn.Module) -> Iterator[None]:
    """Forward passes inside still normalise with their batch statistics (in train mode) but leave the running
    statistics as they were: momentum 0 makes PyTorch's update running <- running."""
    layers = _batchnorms(model)
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, dataset, *, device="cpu", batch_size: int = 4, workers: int = 0,
                        progress: bool = False) -> int:
    """AdaBN: replace every batch norm's running mean and variance by their average over ``dataset``'s images
    (equal weight per batch, PyTorch's cumulative mode). No weight changes. Returns the number of batches used.

    Frozen batch norms (FrozenBatchNorm2d) have no running statistics to update and are left alone.
    """
    from tqdm.auto import tqdm

    layers = _batchnorms(model)
    if not layers:
        raise ValueError("the model has no trainable batch norm layers to re-estimate (bn: frozen?)")
    if len(dataset) == 0:
        raise ValueError("recompute_batchnorm needs at least one image")
    was_training = model.training
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
    model.train()
    normalize = model.info.normalization
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    batches = 0
    try:
        for batch in tqdm(loader, desc="AdaBN", disable=not progress):
            if not has_images(batch):  # every frame of it unreadable
                continue
            model(normalize(batch["image"].to(device)))
            batches += 1
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum
        model.train(was_training)
    return batches
