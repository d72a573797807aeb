"""The deployment commands as users type them: defaults for model, checkpoint and output folder; side files for
robotics stacks and `sdca export --describe`; one-line summaries in `sdca --help`."""
import csv

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sdca.deploy.metadata import read_onnx_metadata
from sdca.models import build_model, save_checkpoint
from tests.common_utils import run_sdca


def sdca(*args, cwd, env=None):
    return run_sdca(*args, cwd=cwd, env=env)


@pytest.fixture
def workspace(tmp_path):
    """A user's folder: a run with a final checkpoint of the small model, and a folder of frames."""
    torch.manual_seed(0)
    model = build_model("deeplabv2_small", 19, width=8, train_size=(64, 32)).eval()
    ckpt = tmp_path / "runs" / "mine" / "self-train" / "final.pt"
    ckpt.parent.mkdir(parents=True)
    save_checkpoint(str(ckpt), model)
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((32, 48, 3)) * 255).astype(np.uint8)).save(frames / f"f{i}.png")
    return tmp_path, ckpt


def test_export_defaults_side_files_and_describe(workspace):
    tmp, ckpt = workspace
    out = sdca("export", "--onnx", cwd=tmp)  # no checkpoint, no -o: the newest final checkpoint, model.onnx beside it
    assert out.returncode == 0, out.stderr
    model = ckpt.parent / "model.onnx"
    assert model.exists() and str(ckpt.relative_to(tmp)) in out.stderr
    meta = read_onnx_metadata(str(model))
    labels = (ckpt.parent / "model.labels.txt").read_text().splitlines()
    assert labels == list(meta.class_names)
    with open(ckpt.parent / "model.palette.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["id"]), r["name"], (int(r["r"]), int(r["g"]), int(r["b"]))) for r in rows] == \
           [(i, n, tuple(c)) for i, (n, c) in enumerate(zip(meta.class_names, meta.palette))]
    described = yaml.safe_load((ckpt.parent / "model.yaml").read_text())
    assert described["precision"] == "fp32" and described["output"]["kind"] == "logits"
    assert described["input"]["color_order"] == meta.channel_order == "RGB"
    assert described["input"]["mean"] == list(meta.mean) and described["input"]["std"] == list(meta.std)
    assert described["input"]["train_size"] == [64, 32] and described["input"]["size"] is None
    assert described["ignore_id"] == 255 and described["num_classes"] == 19
    assert described["labels_file"] == "model.labels.txt"
    shown = sdca("export", "--describe", str(model), cwd=tmp)
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout) == described

    # The form of earlier releases still works; fp16 shows in the precision; --no-sidecar writes none.
    half = tmp / "half.onnx"
    out = sdca("export", "--onnx", str(ckpt), "-o", str(half), "--fp16", "--output", "labels", "--no-check",
               "--no-sidecar", cwd=tmp)
    assert out.returncode == 0, out.stderr
    assert not (tmp / "half.yaml").exists()
    from sdca.deploy.sidecar import describe
    assert describe(str(half))["precision"] == "fp16" and describe(str(half))["output"]["dtype"] == "uint8"


def test_infer_finds_the_model_and_makes_its_own_output_folder(workspace):
    tmp, ckpt = workspace
    none = sdca("infer", "frames", cwd=tmp)
    assert none.returncode != 0 and "sdca demo" in none.stderr and "Traceback" not in none.stderr
    assert sdca("export", str(ckpt), cwd=tmp).returncode == 0
    first = sdca("infer", "frames", "--quiet", cwd=tmp)
    assert first.returncode == 0, first.stderr
    assert "model.onnx" in first.stderr and (tmp / "runs" / "infer" / "frames" / "color" / "f0.png").exists()
    second = sdca("infer", "frames", "--quiet", cwd=tmp)  # never into an earlier run's folder
    assert second.returncode == 0 and (tmp / "runs" / "infer" / "frames2" / "summary.json").exists()
    explicit = sdca("infer", "frames", "--quiet", "--out", "mine", cwd=tmp,
                    env={"SDCA_MODEL": str(ckpt)})  # $SDCA_MODEL: here the checkpoint itself (PyTorch backend)
    assert explicit.returncode == 0 and "pytorch" in explicit.stderr and (tmp / "mine" / "summary.json").exists()


def test_train_without_data_says_what_to_do(tmp_path):
    out = sdca("train", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    for expected in ("data.source.root", "gta5_cityscapes_r101", "--set data.target.root", "sdca demo"):
        assert expected in out.stderr
    assert "weights" not in out.stderr  # not an error about ImageNet files the user was never asked for


def test_every_command_has_a_whole_one_line_summary(tmp_path):

    from sdca.cli import main

    listing = sdca("--help", cwd=tmp_path).stdout
    for name, command in main.commands.items():
        summary = command.get_short_help_str(limit=120)
        assert summary and not summary.endswith(("...", "Eq.")), (name, summary)
        assert name in listing
