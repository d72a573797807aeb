"""`sdca adapt-bn` and the adapt-bn stage: statistics from target frames, modes kept, bad input refused."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sdca.engine.adapt_bn import adapt_batchnorm
from sdca.models import FrozenBatchNorm2d, build_model, load_model, read_checkpoint, save_checkpoint


def _frames(folder, n=6, size=(40, 24), seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        # Brighter than anything a fresh model's statistics describe, and unevenly so per channel.
        image = np.clip(rng.normal((200, 120, 60), 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"f{i}.png")
        Image.fromarray(image).save(path)
        paths.append(path)
    return sorted(paths)


def _first_layer_stats(model, paths, batch):
    """Brute force: read the frames with Pillow, normalise, apply the stem convolution, average per-batch channel
    means and unbiased variances with equal weight per batch (AdaBN's cumulative average)."""
    norm = model.info.normalization
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                     for p in paths])
    with torch.no_grad():
        y = model.backbone.conv1(norm(x))
    chunks = y.split(batch)
    mean = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    var = torch.stack([c.var((0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    return mean, var


@pytest.mark.parametrize("bn", ["train", "frozen"])
def test_adapt_bn_takes_first_layer_statistics_from_the_frames(tmp_path, bn):
    torch.manual_seed(0)
    model = build_model("deeplabv2_small", 19, width=4, bn=bn, train_size=(40, 24)).eval()
    ckpt, out = str(tmp_path / "m.pt"), str(tmp_path / "adapted.pt")
    save_checkpoint(ckpt, model, statistics={"marker": 1})
    paths = _frames(str(tmp_path / "frames"))
    summary = adapt_batchnorm(ckpt, paths, out, batch_size=2, progress=False)
    assert summary["frames"] == 6 and summary["batches"] == 3
    adapted = load_model(out)
    want_mean, want_var = _first_layer_stats(model, paths, 2)
    torch.testing.assert_close(adapted.backbone.bn1.running_mean, want_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapted.backbone.bn1.running_var, want_var, rtol=1e-4, atol=1e-5)
    assert isinstance(adapted.backbone.bn1, FrozenBatchNorm2d) == (bn == "frozen")  # the mode is kept
    assert adapted.info.bn == bn
    for (name, a), (_, b) in zip(model.named_parameters(), adapted.named_parameters()):
        assert torch.equal(a, b), name  # weights untouched
    ckpt_out = read_checkpoint(out)
    assert ckpt_out["statistics"] == {"marker": 1} and ckpt_out["extra"]["stage"] == "adapt-bn"


def test_adapt_bn_caps_frames_and_refuses_bad_input(tmp_path):
    model = build_model("deeplabv2_small", 19, width=4, bn="train", train_size=(40, 24))
    ckpt = str(tmp_path / "m.pt")
    save_checkpoint(ckpt, model)
    paths = _frames(str(tmp_path / "frames"), n=8)
    assert adapt_batchnorm(ckpt, paths, str(tmp_path / "a.pt"), max_frames=4, batch_size=2,
                           progress=False)["frames"] == 4
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        adapt_batchnorm(ckpt, paths, str(tmp_path / "b.pt"), batch_size=1, progress=False)
    vgg = str(tmp_path / "vgg.pt")
    save_checkpoint(vgg, build_model("deeplabv2_vgg16", 19))
    with pytest.raises(ValueError, match="no batch norm"):
        adapt_batchnorm(vgg, paths, str(tmp_path / "c.pt"), progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    (broken / "y.png").write_bytes(b"nor this")
    with pytest.raises(ValueError, match="could be read"):
        adapt_batchnorm(ckpt, sorted(map(str, broken.iterdir())), str(tmp_path / "d.pt"), batch_size=2,
                        progress=False)
    assert not os.path.exists(tmp_path / "d.pt")


def test_adapt_bn_cli(tmp_path):
    model = build_model("deeplabv2_small", 19, width=4, bn="train", train_size=(40, 24))
    ckpt = str(tmp_path / "m.pt")
    save_checkpoint(ckpt, model)
    folder = tmp_path / "cam"
    _frames(str(folder), n=4)
    sdca = [sys.executable, "-m", "sdca"]
    run = subprocess.run(sdca + ["adapt-bn", ckpt, str(folder), str(tmp_path / "cam" / "*.png"), "-o",
                                 str(tmp_path / "out.pt"), "--quiet", "--device", "cpu"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "on 8 frames" in run.stdout  # the folder and the glob, each of its 4 frames
    empty = tmp_path / "empty"
    empty.mkdir()
    run = subprocess.run(sdca + ["adapt-bn", ckpt, str(empty), "-o", str(tmp_path / "x.pt")], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "TARGET" in run.stderr and "no target frames" in run.stderr


def test_adapt_bn_stage_after_training(tiny_data):
    from sdca.engine import Runner, load_config

    tmp_path, config = tiny_data
    config = dict(config, model=dict(config["model"], bn="train"))
    cfg = load_config(None, [], **config)
    runner = Runner(cfg, progress=False)
    runner.train(["source", "adapt-bn"])
    adapted, source = load_model(runner.final_path("adapt-bn")), load_model(runner.final_path("source"))
    assert not torch.equal(adapted.backbone.bn1.running_mean, source.backbone.bn1.running_mean)
    for a, b in zip(adapted.parameters(), source.parameters()):
        assert torch.equal(a, b)
