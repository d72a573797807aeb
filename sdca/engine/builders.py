"""Builders with explicit arguments: data sets, resumable sample streams, loaders, model, optimizer."""
from __future__ import annotations

import os
import random
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import (
    GTA5,
    Cityscapes,
    CrossCity,
    ImageFolder,
    ImagesAndLabelMaps,
    LabelledFolder,
    Synthia,
    collate,
    has_images,
)
from ..data.kinds import DATASET_KINDS
from ..models import build_model
from .config import DatasetConfig, ModelConfig, SolverConfig, StageSolver


def _gta5(ds, num_classes, transform, on_error, progress):
    return GTA5(ds.root, num_classes=num_classes, list_file=ds.list_file, transform=transform, on_error=on_error)


def _synthia(ds, num_classes, transform, on_error, progress):
    return Synthia(ds.root, list_file=ds.list_file, transform=transform, on_error=on_error)


def _cityscapes(ds, num_classes, transform, on_error, progress):
    return Cityscapes(ds.root, ds.split, num_classes=num_classes, list_file=ds.list_file, transform=transform,
                      labelled=ds.labelled, on_error=on_error)


def _crosscity(ds, num_classes, transform, on_error, progress):
    if not ds.city:
        raise ValueError("a crosscity data set needs city: Rome, Rio, Tokyo or Taipei")
    return CrossCity(ds.root, ds.city, ds.split, list_file=ds.list_file, transform=transform, on_error=on_error)


def _folder(ds, num_classes, transform, on_error, progress):
    if not (ds.labels and ds.mapping):
        raise ValueError("a folder data set needs root (images), labels (folder) and mapping (YAML)")
    return LabelledFolder(ds.root, ds.labels, ds.mapping, list_file=ds.list_file, transform=transform,
                          on_error=on_error)


def _images(ds, num_classes, transform, on_error, progress):
    return ImageFolder(ds.root, list_file=ds.list_file, transform=transform, on_error=on_error)


def _synthdrive(ds, num_classes, transform, on_error, progress):
    from ..data.labels import CITYSCAPES
    from ..data.synthdrive import SynthDriveCache

    if num_classes != 19:
        raise ValueError("SynthDrive is labelled with the 19 Cityscapes trainIds: set model.num_classes=19")
    cache = SynthDriveCache(ds.root, ds.domain, ds.split, ds.num_frames, height=ds.frame_size[1],
                            width=ds.frame_size[0], progress=progress)
    images = os.path.join(cache.folder, "images")
    if not ds.labelled:
        return ImageFolder(images, transform=transform, on_error=on_error)
    return ImagesAndLabelMaps(images, cache.names(), os.path.join(cache.folder, "labels"), CITYSCAPES, transform,
                              on_error)


# One builder per kind of sdca.data.kinds (checked at import: a kind added there without a builder fails here).
BUILDERS = {"gta5": _gta5, "synthia": _synthia, "cityscapes": _cityscapes, "crosscity": _crosscity,
            "folder": _folder, "images": _images, "synthdrive": _synthdrive}
assert set(BUILDERS) == set(DATASET_KINDS), "sdca.data.kinds and the builders disagree"


def build_dataset(ds: DatasetConfig, num_classes: int, transform=None, on_error: str = "skip",
                  progress: bool = False) -> Dataset:
    """The data set a DatasetConfig describes (see docs/data.md for the layouts)."""
    if ds.kind not in BUILDERS:
        raise ValueError(f"unknown data set kind {ds.kind!r} (kinds: {', '.join(DATASET_KINDS)})")
    return BUILDERS[ds.kind](ds, num_classes, transform, on_error, progress)


# -------------------------------------------------------------------------------------- sample streams
class ListStream(Sampler):
    """An endless stream over a fixed order of indices (repeated): (position, index) pairs. Under DDP rank r takes
    every world-th position of the one global order; ``start`` skips this rank's first positions (resume)."""

    def __init__(self, order, rank: int = 0, world_size: int = 1, start: int = 0):
        if len(order) == 0:
            raise ValueError("cannot stream an empty order")
        self.order, self.rank, self.world_size, self.start = list(order), rank, world_size, start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        local = self.start
        while True:
            pos = local * self.world_size + self.rank
            yield pos, self.order[pos % len(self.order)]
            local += 1

    def __len__(self) -> int:
        return 2 ** 62


class SampleStream(Sampler):
    """An endless, deterministic stream over ``n`` items: (position, index) pairs.

    Epoch e visits a permutation drawn from ``seed + e``; under DDP rank r takes every world-th position, so
    ranks see disjoint samples. ``start`` skips the first positions of this rank, which is how a resumed run
    continues exactly where it stopped.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if n == 0:
            raise ValueError("cannot stream an empty data set")
        self.n, self.seed, self.rank, self.world_size, self.start = n, seed, rank, world_size, start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        local = self.start
        perm_epoch, perm = -1, None
        while True:
            pos = local * self.world_size + self.rank
            epoch = pos // self.n
            if epoch != perm_epoch:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
                perm_epoch = epoch
            yield pos, perm[pos % self.n]
            local += 1

    def __len__(self) -> int:  # endless; DataLoader only needs something
        return 2 ** 62


class SeededDataset(Dataset):
    """Random augmentation seeded by the stream position, so a sample is the same whichever worker draws it
    and whether or not the run was resumed. The caller's RNG states are left untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> dict:
        pos, index = key
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            sample_seed = (self.seed * 1_000_003 + pos) % (2 ** 31)
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            torch.manual_seed(sample_seed)
            sample = self.dataset[index]
        random.setstate(py_state)
        np.random.set_state(np_state)
        return sample


class Stream:
    """Batches from a SampleStream, counting what was consumed (the resume position).

    A batch whose every frame was unreadable is skipped (the next one is drawn); the names of all skipped
    frames travel with the batch that is returned."""

    def __init__(self, dataset: Dataset, batch_size: int, workers: int, seed: int, rank: int = 0,
                 world_size: int = 1, consumed: int = 0, order=None, pin_memory: bool = False):
        self.batch_size, self.consumed = batch_size, consumed
        sampler = (SampleStream(len(dataset), seed, rank, world_size, start=consumed) if order is None
                   else ListStream(order, rank, world_size, start=consumed))
        self.loader = DataLoader(SeededDataset(dataset, seed), batch_size=batch_size, sampler=sampler,
                                 num_workers=workers, collate_fn=collate, drop_last=True, pin_memory=pin_memory,
                                 persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None)
        self._it = iter(self.loader)

    def __next__(self) -> dict:
        skipped, mismatched = [], []
        for _ in range(10_000):
            batch = next(self._it)
            self.consumed += self.batch_size
            skipped += batch["skipped"]
            mismatched += batch["mismatched"]
            if has_images(batch):
                batch["skipped"], batch["mismatched"] = skipped, mismatched
                return batch
        raise RuntimeError(f"10,000 batches in a row had no readable frame (e.g. {skipped[0]}): is the data "
                           "set's folder readable at all?")


def auto_workers(device_type: str, streams: int, local_world_size: Optional[int] = None,
                 cpus: Optional[int] = None) -> int:
    """Loader processes per stream when data.workers is empty: on CUDA, the CPUs each GPU's process has (less
    one for the training process itself) shared by its streams, 1 to 8 each (``bench/bench_loader.py`` gives
    the images/s one worker delivers per stage); elsewhere 2, the count the CPU runs were measured with."""
    if device_type != "cuda":
        return 2
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, local_world_size)
    return max(1, min(8, (per_process - 1) // max(1, streams)))


# ----------------------------------------------------------------------------------- model, optimizer
def build_model_from_config(m: ModelConfig, train_size=None, class_names=None, palette=None, trusted=False):
    pretrained = None if m.no_pretrained else m.pretrained
    if pretrained is None and m.arch == "deeplabv2_lite0" and not m.no_pretrained:
        pretrained = "imagenet"  # its weights ship with a package: nothing for the user to fetch
    if pretrained is None and not m.no_pretrained and m.arch != "deeplabv2_small":
        raise ValueError(f"{m.arch} starts from ImageNet weights: set model.pretrained to a local torchvision file "
                         "(docs/models.md says which file) or pass --no-pretrained to train from scratch")
    return build_model(m.arch, m.num_classes, bn=m.bn, pretrained=pretrained, width=m.width,
                       train_size=train_size, class_names=class_names, palette=palette,
                       output_stride=m.output_stride, trusted=trusted)


def build_optimizer(model, solver: SolverConfig, stage: StageSolver, extra_head=()) -> torch.optim.Optimizer:
    """SGD with momentum (or AdamW, ``stage.optimizer``) and weight decay; the ASPP head, and ``extra_head``
    (parameters trained beside it, e.g. a projection head), at ``head_lr_mult`` x the backbone's learning rate."""
    module = model.module if hasattr(model, "module") else model
    backbone, head = module.parameter_groups()
    head = list(head) + [p for p in extra_head if p.requires_grad]
    groups = [{"params": backbone, "lr": stage.lr, "lr_mult": 1.0},
              {"params": head, "lr": stage.lr * solver.head_lr_mult, "lr_mult": solver.head_lr_mult}]
    groups = [g for g in groups if g["params"]]
    decay = solver.weight_decay if stage.weight_decay is None else stage.weight_decay
    if stage.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=stage.lr, betas=tuple(stage.betas), weight_decay=decay)
    return torch.optim.SGD(groups, lr=stage.lr, momentum=solver.momentum, weight_decay=decay)


def poly_lr(base_lr: float, it: int, max_iter: int, power: float) -> float:
    return base_lr * max(0.0, 1.0 - it / max(1, max_iter)) ** power
