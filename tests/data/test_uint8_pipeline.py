"""The loader pipeline that feeds a GPU: uint8 out of the workers, photometric augmentation drawn in the worker and
applied on the device. Against the float pipeline: the same random draws, the same image up to the uint8
rounding of the resize."""
import random

import numpy as np
import pytest
import torch

from sdca.data import collate
from sdca.data.transforms import build_transform, finish_images
from sdca.engine.builders import auto_workers


def frame(h=300, w=500, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 255 // (w + h))], -1).astype(np.float64)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


POLICIES = [
    dict(size=(200, 120), jitter=True, grayscale=0.5, blur=True, resize="bicubic"),  # adapt, source side
    dict(size=(200, 120), scale=(0.5, 1.5), crop=(96, 64), flip=True, jitter=True, grayscale=0.2, blur=True),
    dict(size=(200, 120)),  # adapt, target side: resize only
]


def run(policy, uint8, seed, image, label):
    random.seed(seed)
    torch.manual_seed(seed)
    sample = build_transform(**policy, uint8=uint8)({"image": image.copy(), "label": label.copy()})
    after = (random.random(), float(torch.rand(())))  # where both generators stand afterwards
    return sample, after


@pytest.mark.parametrize("policy", POLICIES)
def test_uint8_pipeline_draws_the_same_and_matches_the_float_one(policy):
    image, label = frame(), (np.arange(300 * 500) % 7).reshape(300, 500).astype(np.uint8)
    diffs = []
    for seed in range(12):
        ref, ref_after = run(policy, False, seed, image, label)
        got, got_after = run(policy, True, seed, image, label)
        assert got_after == ref_after  # the same random calls, in the same order
        assert got["image"].dtype == torch.uint8 and ref["image"].dtype == torch.float32
        assert torch.equal(got["label"], ref["label"])  # geometry is identical
        expected_draws = int(policy.get("jitter", False)) + int(policy.get("blur", False))
        assert len(got["photometric"]) >= expected_draws
        finished = finish_images(got["image"][None], [got["photometric"]])[0]
        diffs.append((finished - ref["image"]).abs())
    d = torch.stack(diffs)
    # The only difference is the uint8 rounding after each resize (at most half a level each, then the jitter's
    # contrast and saturation factors of at most 1.5 on top): a few levels at worst, a fraction on average.
    assert float(d.max()) <= 6 / 255 and float(d.mean()) <= 0.5 / 255


def test_deferred_draws_travel_through_collate_and_apply_per_sample():
    t = build_transform(size=(64, 32), jitter=True, grayscale=1.0, blur=True, uint8=True)
    samples = []
    for seed in (1, 2):
        random.seed(seed)
        torch.manual_seed(seed)
        samples.append(t({"image": frame(40, 80, seed)}))
    batch = collate(samples)
    assert batch["image"].dtype == torch.uint8 and len(batch["photometric"]) == 2
    out = finish_images(batch["image"], batch["photometric"])
    for i, s in enumerate(samples):  # each sample gets its own draws, not its neighbour's
        assert torch.equal(out[i], finish_images(s["image"][None], [s["photometric"]])[0])
    gray = out[0]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])  # grayscale p = 1 was applied
    plain = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    assert torch.equal(finish_images(plain), plain.float() / 255)


@pytest.mark.parametrize("device,streams,local,cpus,expected", [
    ("cpu", 2, 1, 64, 2),        # CPU runs keep the count their figures were measured with
    ("cuda", 2, 4, 64, 7),       # 16 CPUs per GPU process, one for the trainer, two streams: 7 each
    ("cuda", 1, 8, 64, 7),
    ("cuda", 1, 1, 128, 8),      # capped
    ("cuda", 2, 8, 8, 1)])       # at least one
def test_auto_workers(device, streams, local, cpus, expected):
    assert auto_workers(device, streams, local_world_size=local, cpus=cpus) == expected
