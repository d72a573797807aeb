"""The paper presets resolve to the public training recipe (docs/reference/official_recipe.md), stage by stage."""
import random

import numpy as np
import pytest
import torch

from sdca.engine import load_config
from sdca.engine.recipe import recipe_rows, stage_data, stage_transform

# The public recipe at its 4 processes, written out from the reference file. Per stage: lr, poly length, stop,
# global batch per domain, batch norm, input size, (scale range, its base), flip, (jitter, grayscale, blur),
# resize kernel, source sampling.
SRC = dict(lr=5e-4, poly=31250, stop=20000, batch=(8,), flip=False, scale=None, photometric=(False, 0.0, False),
           sampling="class_balanced")
SDCA = dict(lr=2.5e-4, poly=62500, stop=40000, batch=(4, 4), flip=False, scale=None,
            photometric=(True, 0.2, True), sampling="class_balanced")
SSL = dict(lr=5e-4, poly=31250, stop=20000, batch=(8,), flip=True, scale=((0.5, 1.5), "raw"),
           photometric=(True, 0.2, True), sampling="uniform")
PUBLIC = {
    "gta5_cityscapes_r101": dict(source_size=(1280, 720), bn=("frozen", "frozen", "sync"), ssl_photometric=True),
    "synthia_cityscapes_r101": dict(source_size=(1280, 760), bn=("frozen", "frozen", "sync"), ssl_photometric=True),
    "gta5_cityscapes_vgg16": dict(source_size=(1280, 720), bn=(None, None, None), ssl_photometric=False),
    "synthia_cityscapes_vgg16": dict(source_size=(1280, 760), bn=(None, None, None), ssl_photometric=False),
    "cityscapes_crosscity_r101": dict(source_size=(1024, 512), bn=("frozen", "frozen", "sync"), ssl_photometric=True),
}


def resolved(cfg, stage, world_size=4):
    r = stage_data(cfg, stage)
    solver = getattr(cfg.solver, stage)
    batch = (r.batch_size * world_size, r.target_batch_size * world_size) if stage == "adapt" else \
        (r.batch_size * world_size,)
    return dict(lr=solver.lr, poly=solver.schedule_iters or solver.iters, stop=solver.iters, batch=batch,
                flip=r.flip, scale=(r.scale, r.scale_base) if r.scale else None,
                photometric=(r.jitter, r.grayscale, r.blur), sampling=r.sampling)


@pytest.mark.parametrize("preset", sorted(PUBLIC))
def test_paper_presets_resolve_to_the_public_recipe(preset):
    cfg = load_config(preset)
    want = PUBLIC[preset]
    ssl = dict(SSL, photometric=(True, 0.2, True) if want["ssl_photometric"] else (False, 0.0, False))
    for stage, expected in (("source", SRC), ("adapt", SDCA), ("self_train", ssl)):
        assert resolved(cfg, stage) == expected, stage
    assert tuple(cfg.data.source_size) == want["source_size"] and tuple(cfg.data.target_size) == (1024, 512)
    assert stage_data(cfg, "self_train").crop == (1024, 512)
    assert cfg.data.resize == "bicubic" and tuple(cfg.eval.size) == (1024, 512)
    is_vgg = cfg.model.arch == "deeplabv2_vgg16"
    bn = (None if is_vgg else cfg.model.bn, None if is_vgg else cfg.method.adapt_bn,
          None if is_vgg else (cfg.method.self_train_bn or cfg.model.bn))
    assert bn == want["bn"]
    assert cfg.method.self_train_from_imagenet  # the public ssl script passes no checkpoint
    assert cfg.solver.select == "final"  # ours by default; the public script's selection is solver.select=best
    if is_vgg:
        assert cfg.model.pretrained.endswith("vgg16-00b39a1b.pth")  # the Caffe weights, not torchvision's
    rows = recipe_rows(cfg, 4)
    assert [r["global batch (4 proc.)"] for r in rows] == ["8", "4 + 4", "8"]


def test_one_policy_configs_keep_their_own_choices():
    """The default preset (and SynthDrive) set no per-stage data: every stage takes the data-wide settings."""
    cfg = load_config("default")
    for stage in ("source", "adapt"):
        r = stage_data(cfg, stage)
        assert (r.batch_size, r.jitter, r.grayscale, r.blur, r.flip, r.scale, r.sampling) == \
               (cfg.data.batch_size, True, 0.2, True, False, None, "uniform")
    r = stage_data(cfg, "self_train")
    assert (r.scale, r.scale_base, r.crop, r.flip) == ((0.5, 1.5), "size", tuple(cfg.data.target_size), True)
    assert cfg.data.resize == "bilinear"


def test_self_train_scale_is_drawn_on_the_raw_image_and_never_pads_a_large_enough_crop(monkeypatch):
    """Public ssl: the raw image scaled by U(0.5, 1.5), then the crop. At the lowest draw a 2048x1024-shaped raw
    frame scales to exactly the crop size, so no pixel is padded; the old pipeline resized to 1024x512 first and
    then halved it, padding three quarters of the crop with ignore."""
    cfg = load_config("gta5_cityscapes_r101", ["data.target_size=[64, 32]",
                                               "data.stages.self_train.crop=[64, 32]"])
    transform = stage_transform(cfg, "self_train")
    image = (np.random.default_rng(0).random((64, 128, 3)) * 255).astype(np.uint8)  # a "raw" 128x64 frame
    label = np.zeros((64, 128), dtype=np.uint8)
    monkeypatch.setattr(random, "uniform", lambda a, b: a)  # the scale draw, at its low end
    out = transform({"image": image.copy(), "label": label.copy()})
    assert tuple(out["image"].shape) == (3, 32, 64) and not (out["label"] == 255).any()
    old = load_config("default", ["data.target_size=[64, 32]"])  # resize to the target size, then scale
    out_old = stage_transform(old, "self_train")({"image": image.copy(), "label": label.copy()})
    assert (out_old["label"] == 255).float().mean() == pytest.approx(0.75)
    for draw in (0.7, 1.0, 1.5):  # any draw: the crop is of the scaled raw frame, never padded
        monkeypatch.setattr(random, "uniform", lambda a, b, d=draw: d)
        out = transform({"image": image.copy(), "label": label.copy()})
        assert tuple(out["label"].shape) == (32, 64) and not (out["label"] == 255).any()


def test_bicubic_resize_is_pils_bicubic():
    """data.resize=bicubic resizes as the public code's PIL bicubic does (antialiased when shrinking)."""
    from PIL import Image

    from sdca.data.transforms import resize_image

    rgb = (np.random.default_rng(1).random((48, 80, 3)) * 255).astype(np.uint8)
    for size in ((24, 40), (96, 160)):
        ours = resize_image(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255, size, "bicubic")
        pil = np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.BICUBIC)).astype(np.float32) / 255
        assert np.abs(ours.permute(1, 2, 0).numpy() - pil).mean() < 2e-3  # PIL rounds to 8 bits
