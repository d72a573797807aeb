"""Class-balanced source sampling, as the public code's source and adaptation stages do it (FADA's rule), and
DAFormer's rare-class sampling (:func:`rare_class_order`), as SePiCo's one-stage recipe uses it.

Each label file's set of classes is read once (streamed, with a progress bar) and cached in a JSON file named by
a fingerprint of the file list; the order of source images is then drawn so that rare classes come up far more
often than under uniform sampling:

- picks come in sub-epochs of 3,000; ``dist`` is the normalised count of classes over the files picked so far
  in the sub-epoch (all zeros at its start);
- a class c is drawn with probability proportional to 1 / log(1.01 + dist_c), among the classes some file
  contains;
- the next file of c's list is taken (lists start in file order and are reshuffled each time they wrap
  around), and its classes are added to the counts.

``picks // 3000 + 1`` sub-epochs are drawn, where ``picks`` = iterations x global batch: as many as the stage
consumes. (The public code draws ``iters // 3000 + 1`` sub-epochs and repeats the list to cover
iters x batch, i.e. the same order about batch-size times; a stream here repeats it only past its end.)
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Sequence, Set

import numpy as np

from .io import CorruptImageError

SUB_EPOCH = 3000


def _fingerprint(dataset, num_classes: int) -> str:
    h = hashlib.sha1(f"{type(dataset).__name__}|{num_classes}|{dataset.image_root}".encode())
    for name, label in dataset.items:
        h.update(f"{name}|{label}\n".encode())
    return h.hexdigest()[:16]


def _cache_file(dataset, num_classes: int, cache_dir: str, what: str = "class_sets") -> str:
    return os.path.join(cache_dir, f"{what}-{_fingerprint(dataset, num_classes)}.json")


def _scan_labels(dataset, num_classes: int, cache_dir: str, progress: bool, what: str, read, empty):
    """``read(label)`` of every labelled item, cached as JSON (see :func:`class_sets`); ``empty`` for a label
    that cannot be read."""
    from tqdm.auto import tqdm

    from .._atomic import atomic_write_text

    if not getattr(dataset, "items", None) or dataset.decode_label is None:
        raise ValueError(f"{what.replace('_', ' ')} need a labelled data set")
    label_dir = os.path.commonpath([os.path.dirname(label) for _, label in dataset.items])  # the label folder
    candidates = [d for d in (label_dir, cache_dir) if d]
    for folder in candidates:
        path = _cache_file(dataset, num_classes, folder, what)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)["classes"]
    values = []
    for _, label_path in tqdm(dataset.items, desc=f"{what.replace('_', ' ')} (once per file list)",
                              disable=not progress, dynamic_ncols=True):
        try:
            label = dataset.decode_label(label_path)
        except CorruptImageError:
            values.append(empty)
            continue
        values.append(read(label))
    text = json.dumps({"num_classes": num_classes, "files": len(values), "classes": values})
    for folder in candidates:
        try:
            os.makedirs(folder, exist_ok=True)
            atomic_write_text(_cache_file(dataset, num_classes, folder, what), text)
            break
        except OSError:
            continue  # a read-only data folder: the run folder holds the cache instead
    return values


def class_sets(dataset, num_classes: int, *, cache_dir: str, progress: bool = False) -> List[Set[int]]:
    """The classes each labelled item of ``dataset`` (a SegmentationDataset) contains, ignore excluded.

    Cached as ``class_sets-<fingerprint>.json`` beside the data (the label folder) when that folder is writable,
    else in ``cache_dir``; the fingerprint covers the data set kind, the class count and every (image, label)
    path, so another file list never reuses a stale table. A label that cannot be read gives an empty set: that
    item is never drawn.
    """
    def read(label):
        return sorted(int(c) for c in np.unique(label) if c < num_classes)
    return [set(s) for s in _scan_labels(dataset, num_classes, cache_dir, progress, "class_sets", read, [])]


def class_pixel_counts(dataset, num_classes: int, *, cache_dir: str, progress: bool = False) -> np.ndarray:
    """[items, num_classes] int64: each labelled item's pixel count per class (ignore excluded), cached as
    ``class_pixel_counts-<fingerprint>.json`` like :func:`class_sets`; an unreadable label counts nothing."""
    def read(label):
        label = np.asarray(label).reshape(-1)
        return np.bincount(label[label < num_classes], minlength=num_classes)[:num_classes].tolist()
    counts = _scan_labels(dataset, num_classes, cache_dir, progress, "class_pixel_counts", read, [0] * num_classes)
    return np.asarray(counts, dtype=np.int64).reshape(len(counts), num_classes)


def rare_class_probabilities(frequencies: Sequence[float], temperature: float) -> np.ndarray:
    """DAFormer's rare-class sampling: P(c) = softmax((1 - f_c) / T) over the classes with a non-zero
    frequency ``f`` (the share of the source set's labelled pixels); classes never seen get 0."""
    f = np.asarray(frequencies, dtype=np.float64)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    seen = f > 0
    if not seen.any():
        raise ValueError("no class has any pixel: nothing to sample")
    z = np.where(seen, (1.0 - f) / temperature, -np.inf)
    p = np.exp(z - z[seen].max())
    return p / p.sum()


def rare_class_order(counts: np.ndarray, iters: int, seed: int, batch: int = 1, temperature: float = 0.01,
                     min_pixels: int = 3000) -> List[int]:
    """Item indices drawn by DAFormer's rule, ``iters`` x ``batch`` of them (``batch``: the global batch): a class c
    with :func:`rare_class_probabilities` of the pixel frequencies in ``counts`` ([items, classes]), then an item
    uniformly among those with more than ``min_pixels`` pixels of c (classes no item has that many of are never
    drawn). Draws come from ``numpy.random.default_rng(seed)``. (DAFormer also redraws a crop until it holds
    half of ``min_pixels`` of c; crops here are drawn by the transform, which does not see the class.)"""
    counts = np.asarray(counts)
    items_of = [np.flatnonzero(counts[:, c] > min_pixels) for c in range(counts.shape[1])]
    freq = counts.sum(0) / max(1, counts.sum())
    freq = np.where([len(i) > 0 for i in items_of], freq, 0.0)
    p = rare_class_probabilities(freq, temperature)
    rng = np.random.default_rng(seed)
    classes = rng.choice(len(p), size=iters * batch, p=p)
    return [int(items_of[c][rng.integers(len(items_of[c]))]) for c in classes]


def class_balanced_order(sets: Sequence[Set[int]], num_classes: int, iters: int, seed: int,
                         batch: int = 1) -> List[int]:
    """Item indices in the order FADA's rule draws them (see the module docstring): at least ``iters`` x
    ``batch`` picks (``batch``: the global batch), in ``iters * batch // 3000 + 1`` sub-epochs. Random draws
    come from ``numpy.random.default_rng(seed)``: per pick one ``choice`` of the class, and one ``shuffle`` of
    a class's list each time it wraps around."""
    files_of = [[i for i, s in enumerate(sets) if c in s] for c in range(num_classes)]
    drawable = np.array([len(f) > 0 for f in files_of])
    if not drawable.any():
        raise ValueError("no label file contains any class: nothing to sample")
    rng = np.random.default_rng(seed)
    position = [0] * num_classes
    order: List[int] = []
    for _ in range(iters * batch // SUB_EPOCH + 1):
        counts = np.zeros(num_classes)
        for _ in range(SUB_EPOCH):
            dist = counts / counts.sum() if counts.sum() > 0 else counts
            weight = np.where(drawable, 1.0 / np.log(1.01 + dist), 0.0)
            c = int(rng.choice(num_classes, p=weight / weight.sum()))
            if position[c] >= len(files_of[c]):
                rng.shuffle(files_of[c])
                position[c] = 0
            item = files_of[c][position[c]]
            position[c] += 1
            order.append(item)
            for k in sets[item]:
                counts[k] += 1
    return order
