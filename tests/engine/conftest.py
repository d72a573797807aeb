"""Tiny fabricated scenes: sky above, road below, a car box; a 'sim' source look and a darker 'real' target."""
import os

import numpy as np
import pytest
from PIL import Image

SKY, ROAD, CAR, BUILDING = 10, 0, 13, 2  # Cityscapes trainIds
RAW = {SKY: 23, ROAD: 7, CAR: 26, BUILDING: 11}  # their Cityscapes labelIds (the folder mapping maps them back)
COLOURS = {SKY: (70, 130, 180), ROAD: (128, 64, 128), CAR: (0, 0, 142), BUILDING: (70, 70, 70)}


def scene(rng, h, w, real: bool):
    label = np.full((h, w), SKY, dtype=np.uint8)
    horizon = int(h * rng.uniform(0.4, 0.6))
    label[horizon:] = ROAD
    bx = int(rng.integers(0, w // 2))
    label[h // 4:horizon, bx:bx + w // 4] = BUILDING
    cx, cy = int(rng.integers(0, w - w // 4)), int(rng.integers(horizon, h - h // 6))
    label[cy:cy + h // 6, cx:cx + w // 4] = CAR
    image = np.zeros((h, w, 3), dtype=np.float32)
    for cls, colour in COLOURS.items():
        image[label == cls] = colour
    if real:  # another look: darker, warmer, noisy
        image = image * 0.7 + np.array([30, 10, -10]) + rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_tree(root, n, h, w, real, seed, labels=True):
    rng = np.random.default_rng(seed)
    raw_table = np.zeros(256, dtype=np.uint8)
    for cls, raw in RAW.items():
        raw_table[cls] = raw
    for i in range(n):
        image, label = scene(rng, h, w, real)
        os.makedirs(os.path.join(root, "images", f"seq{i % 2}"), exist_ok=True)
        Image.fromarray(image).save(os.path.join(root, "images", f"seq{i % 2}", f"f{i:03d}.png"))
        if labels:
            os.makedirs(os.path.join(root, "labels", f"seq{i % 2}"), exist_ok=True)
            Image.fromarray(raw_table[label]).save(os.path.join(root, "labels", f"seq{i % 2}", f"f{i:03d}.png"))


@pytest.fixture
def tiny_data(tmp_path):
    """Paths and a matching config dict for a complete, tiny run of every stage."""
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("label_space: cityscapes19\nids: {7: road, 11: building, 23: sky, 26: car}\n")
    write_tree(str(tmp_path / "sim"), 6, 32, 64, real=False, seed=0)
    write_tree(str(tmp_path / "real"), 6, 32, 64, real=True, seed=1, labels=False)
    write_tree(str(tmp_path / "realval"), 3, 32, 64, real=True, seed=2)
    def folder(name):
        return {"kind": "folder", "root": str(tmp_path / name / "images"), "labels": str(tmp_path / name / "labels"),
                "mapping": str(mapping)}
    config = {
        "name": "tiny", "output_dir": str(tmp_path / "runs"), "device": "cpu", "seed": 3,
        "model": {"arch": "deeplabv2_small", "num_classes": 19, "width": 8, "bn": "frozen"},
        "data": {"source": folder("sim"), "target": {"kind": "images", "root": str(tmp_path / "real" / "images")},
                 "val": folder("realval"), "source_size": [64, 32], "target_size": [64, 32],
                 "self_train_crop": [48, 24], "batch_size": 2, "workers": 0},
        "solver": {"source": {"iters": 4, "lr": 0.01}, "adapt": {"iters": 3, "lr": 0.005},
                   "self_train": {"iters": 2, "lr": 0.005}, "checkpoint_period": 2, "log_period": 1},
        "method": {"variant": "paper", "covariance": "full", "tau": 0.5},
    }
    return tmp_path, config
