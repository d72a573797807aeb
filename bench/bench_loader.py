"""Loader throughput per worker, per stage of the paper preset, old (float) and new (uint8) pipelines side by side.

    python bench/bench_loader.py [--frames 6] [--repeats 3] [--preset gta5_cityscapes_r101]

Frames are fabricated at the real sizes (GTA5 1914x1052 with labelIds, Cityscapes 2048x1024) in the real
layouts and read through the real data sets, so decode, label mapping, resize and augmentation are all counted.
One thread, as in a DataLoader worker. For each stage and domain stream:

- float: the pipeline the CPU runs use (decode -> float -> resize -> photometric, all in the worker);
- uint8: the GPU's pipeline (decode -> uint8 resize/scale/crop/flip in the worker; photometric drawn there and
  applied by ``finish_images`` on the device). Its device part is timed here on this CPU, single-threaded,
  which overstates what it costs a GPU; it is printed apart from the worker's share.

Then the images/s a GPU step consumes (float32 step times of ``bench/GPU.md``, measured on an H200) and the
workers a 4-GPU node needs per stream to keep up. Ratios are measured in one run, old and new interleaved.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# Per-GPU step times (float32, ResNet-101, one 1280x720 source + one 1024x512 target image) from bench/GPU.md,
# run 3: the source warm-up step and the diagonal adaptation step. Self-training has no GPU measurement yet: the
# source step (one image) stands in for it, which is stated in the output.
GPU_STEP_S = {"source": 0.0736, "adapt": 0.1104, "self_train": 0.0736}


def fabricate(root: str, n: int, seed: int = 0) -> None:
    """GTA5 and Cityscapes trees at their real sizes: smooth colour fields with noise (about the compressibility
    of rendered and camera frames), labels in labelIds as the real files are."""
    rng = np.random.default_rng(seed)
    ids = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33], np.uint8)

    def image(w, h):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.float32)
        return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)

    def label(w, h):
        blocks = rng.integers(0, len(ids), (h // 64 + 1, w // 64 + 1))
        return ids[np.kron(blocks, np.ones((64, 64), np.int64))[:h, :w]]

    for folder in ("images", "labels"):
        os.makedirs(os.path.join(root, "gta5", folder), exist_ok=True)
    for split in ("train",):
        os.makedirs(os.path.join(root, "cityscapes", "leftImg8bit", split, "city"), exist_ok=True)
        os.makedirs(os.path.join(root, "cityscapes", "gtFine", split, "city"), exist_ok=True)
    for i in range(n):
        Image.fromarray(image(1914, 1052)).save(os.path.join(root, "gta5", "images", f"{i:05d}.png"))
        Image.fromarray(label(1914, 1052)).save(os.path.join(root, "gta5", "labels", f"{i:05d}.png"))
        name = f"city_{i:06d}_000019"
        Image.fromarray(image(2048, 1024)).save(
            os.path.join(root, "cityscapes", "leftImg8bit", "train", "city", f"{name}_leftImg8bit.png"))
        Image.fromarray(label(2048, 1024)).save(
            os.path.join(root, "cityscapes", "gtFine", "train", "city", f"{name}_gtFine_labelIds.png"))


def streams(cfg, root):
    """(stage, stream, data set factory(uint8)) for every training stream of the preset."""
    from sdca.data import LabelSpace, PseudoLabelled
    from sdca.engine.builders import build_dataset
    from sdca.engine.config import DatasetConfig
    from sdca.engine.recipe import stage_transform

    gta = DatasetConfig(kind="gta5", root=os.path.join(root, "gta5"))
    city = DatasetConfig(kind="cityscapes", root=os.path.join(root, "cityscapes"), split="train", labelled=False)

    def self_train(uint8):
        target = build_dataset(city, 19, None)
        labels = os.path.join(root, "pseudo")
        if not os.path.isdir(labels):  # pseudo-labels as the pseudo-label stage writes them: trainIds PNGs
            for name in target.names:
                path = os.path.join(labels, os.path.splitext(name)[0] + ".png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(np.full((1024, 2048), 3, np.uint8)).save(path)
        space = LabelSpace("model", tuple(str(i) for i in range(19)), tuple((i, i, i) for i in range(19)))
        return PseudoLabelled(target.image_root, target.names, labels, space,
                              stage_transform(cfg, "self_train", uint8=uint8), "skip")

    return [
        ("source", "source", lambda u: build_dataset(gta, 19, stage_transform(cfg, "source", uint8=u))),
        ("adapt", "source", lambda u: build_dataset(gta, 19, stage_transform(cfg, "adapt", uint8=u))),
        ("adapt", "target", lambda u: build_dataset(city, 19, stage_transform(cfg, "adapt", "target", uint8=u))),
        ("self_train", "target", self_train),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=6, help="fabricated frames per data set")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the frames per pipeline")
    parser.add_argument("--preset", default="gta5_cityscapes_r101")
    parser.add_argument("--gpus", type=int, default=4, help="GPUs of the node the worker counts are given for")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one DataLoader worker's share

    from sdca.data.transforms import finish_images
    from sdca.engine import load_config

    cfg = load_config(args.preset)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        fabricate(root, args.frames)
        for stage, stream, make in streams(cfg, root):
            datasets = {u: make(u) for u in (False, True)}
            worker, device = {False: [], True: []}, []
            for _ in range(args.repeats):  # interleaved: a load change on the machine hits both alike
                for uint8 in (False, True):
                    for i in range(len(datasets[uint8])):
                        start = time.perf_counter()
                        sample = datasets[uint8][i]
                        worker[uint8].append(time.perf_counter() - start)
                        if uint8:
                            start = time.perf_counter()
                            finish_images(sample["image"][None], [sample.get("photometric", [])])
                            device.append(time.perf_counter() - start)
            old, new, dev = (float(np.median(v)) for v in (worker[False], worker[True], device))
            need = 1.0 / GPU_STEP_S[stage]  # one image of this stream per GPU step (GPU.md measured batch 1)
            rows.append((stage, stream, old, new, dev, need))

    print(f"loader throughput, {args.preset}, one thread per worker, {args.frames} frames x {args.repeats} passes "
          f"(medians); torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'stage':<11} {'stream':<7} {'float ms':>9} {'uint8 ms':>9} {'speed-up':>9} {'float img/s':>12} "
          f"{'uint8 img/s':>12} {'device ms':>10} {'GPU needs':>10} {'workers/GPU':>12} {f'node ({args.gpus})':>10}")
    for stage, stream, old, new, dev, need in rows:
        per_gpu = math.ceil(need * new)
        print(f"{stage:<11} {stream:<7} {old * 1e3:9.1f} {new * 1e3:9.1f} {old / new:8.2f}x {1 / old:12.2f} "
              f"{1 / new:12.2f} {dev * 1e3:10.1f} {need:9.1f}/s {per_gpu:12d} {per_gpu * args.gpus:10d}")
    print("GPU needs: images/s of that stream per GPU at bench/GPU.md's float32 step times (self-train: the source "
          "step's, not measured); bf16 steps would need more. workers/GPU = ceil(needs x uint8 seconds per image). "
          "device ms: the deferred photometric part, timed on this CPU (a GPU runs it in a fraction of that).")


if __name__ == "__main__":
    main()
