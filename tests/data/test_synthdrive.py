"""SynthDrive: determinism, valid labels, one layout model behind both looks, the cached data set."""
import numpy as np
import pytest

from sdca.data.synthdrive import (
    CLASSES_USED,
    GENERATOR_VERSION,
    REAL,
    SIM,
    SynthDriveCache,
    frame_seed,
    generate_frame,
    render,
    sample_layout,
)


def test_same_seed_same_bytes_and_different_frames_differ():
    a_img, a_lab = generate_frame("real", "train", 5)
    b_img, b_lab = generate_frame("real", "train", 5)
    assert a_img.tobytes() == b_img.tobytes() and a_lab.tobytes() == b_lab.tobytes()
    c_img, _ = generate_frame("real", "train", 6)
    assert c_img.tobytes() != a_img.tobytes()
    assert frame_seed("sim", "train", 1) != frame_seed("sim", "val", 1) != frame_seed("real", "train", 1)


def test_labels_use_declared_classes_only_and_cover_many():
    seen = set()
    for domain in ("sim", "real"):
        for i in range(40):
            image, labels = generate_frame(domain, "train", i, 128, 256)
            assert image.shape == (128, 256, 3) and image.dtype == np.uint8
            assert labels.shape == (128, 256) and labels.dtype == np.uint8
            values = set(np.unique(labels).tolist())
            assert values <= set(CLASSES_USED) | {255}
            seen |= values
    assert len(seen) >= 12  # SynthDrive's specification: at least 12 of the 19 classes


def test_both_looks_render_one_layout_model():
    """Labels come from the layout alone: one layout rendered in both looks gives identical labels, different
    pixels; and both domains sample their layouts with the same function (only camera and rates differ)."""
    rng = np.random.default_rng(0)
    layout = sample_layout(rng, SIM, 128, 256)
    sim_img, sim_lab = render(layout, SIM, np.random.default_rng(1))
    real_img, real_lab = render(layout, REAL, np.random.default_rng(1))
    assert np.array_equal(sim_lab, real_lab)
    assert np.abs(sim_img.astype(int) - real_img.astype(int)).mean() > 20
    assert set(SIM.object_rate) == set(REAL.object_rate) and SIM.palette.keys() == REAL.palette.keys()
    # The look differs in the ways SynthDrive's real domain is specified to.
    assert REAL.texture > SIM.texture and REAL.blur_sigma > 0 and REAL.noise_std > 0 and REAL.jpeg_quality
    assert REAL.fov_deg != SIM.fov_deg and REAL.camera_height != SIM.camera_height
    assert REAL.object_rate != SIM.object_rate  # other class frequencies (tail classes rarer in sim)


def test_cache_generates_once_and_reads_back(tmp_path):
    cache = SynthDriveCache(str(tmp_path), "sim", "val", 3, height=64, width=128)
    assert GENERATOR_VERSION in cache.folder
    assert cache.ensure() == 0  # already there
    from PIL import Image
    image = np.array(Image.open(f"{cache.folder}/images/000001.png"))
    labels = np.array(Image.open(f"{cache.folder}/labels/000001.png"))
    want_img, want_lab = generate_frame("sim", "val", 1, 64, 128)
    assert np.array_equal(image, want_img) and np.array_equal(labels, want_lab)
    with pytest.raises(ValueError, match="domain must be one of"):
        SynthDriveCache(str(tmp_path), "cartoon", "val", 1)


def test_synthdrive_kind_in_the_engine(tmp_path):
    from sdca.engine.builders import build_dataset
    from sdca.engine.config import DatasetConfig

    ds = build_dataset(DatasetConfig(kind="synthdrive", root=str(tmp_path), domain="real", split="train",
                                     num_frames=2, frame_size=[128, 64]), 19)
    item = ds[1]
    assert item["image"].shape == (3, 64, 128) and item["label"].shape == (64, 128)
    unlabelled = build_dataset(DatasetConfig(kind="synthdrive", root=str(tmp_path), domain="real", num_frames=2,
                                             frame_size=[128, 64], labelled=False), 19)
    assert "label" not in unlabelled[0]
