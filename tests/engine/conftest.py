"""Tiny fabricated scenes: sky above, road below, a car box; a 'sim' source look and a darker 'real' target."""

import pytest

from tests.common_utils import write_tree


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
