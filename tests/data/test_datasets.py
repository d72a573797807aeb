"""Data sets on tiny fabricated trees with the real layouts and label encodings."""
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from sdca.data import (
    GTA5,
    Cityscapes,
    CorruptImageError,
    CrossCity,
    ImageFolder,
    LabelledFolder,
    Synthia,
    build_transform,
    collate,
    has_images,
    trainid_to_labelid,
)

# The label tables of docs/reference/public_code_facts.md, written out again here as the expectation.
LABELID_TO_19 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
                 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LABELID_TO_16 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 23: 9, 24: 10, 25: 11, 26: 12, 28: 13,
                 32: 14, 33: 15}
SYNTHIA_TO_16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11, 8: 12, 19: 13, 12: 14,
                 11: 15}


def expected(raw, table):
    return np.vectorize(lambda v: table.get(int(v), 255))(raw)


def save_rgb(path, h, w, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def save_gray(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)


def save_png16_rgb(path, array):
    """A 16-bit RGB PNG written from the PNG spec (filter 0 per row), independent of any image library."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def all_raw_ids(h, w, high=40, seed=0):
    """Every raw id 0..high-1 (known and unknown ones) at least once, the rest random."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, high, h * w)
    raw[:high] = np.arange(high)
    return raw.reshape(h, w)


def test_cityscapes_layout_and_both_label_maps(tmp_path):
    root = tmp_path / "cityscapes"
    raws = {}
    for city, n in (("aachen", 2), ("bremen", 1)):
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            save_rgb(str(root / "leftImg8bit/val" / city / f"{stem}_leftImg8bit.png"), 12, 10, seed=i)
            raws[f"{city}/{stem}_leftImg8bit.png"] = raw = all_raw_ids(12, 10, seed=i)
            save_gray(str(root / "gtFine/val" / city / f"{stem}_gtFine_labelIds.png"), raw)
    for num_classes, table in ((19, LABELID_TO_19), (16, LABELID_TO_16)):
        ds = Cityscapes(str(root), "val", num_classes=num_classes)
        assert len(ds) == 3 and ds.label_space.num_classes == num_classes
        for item in ds:
            assert item["image"].shape == (3, 12, 10) and item["image"].dtype == torch.float32
            assert np.array_equal(item["label"].numpy(), expected(raws[item["name"]], table))
    unlabelled = Cityscapes(str(root), "val", labelled=False)
    assert "label" not in unlabelled[0]
    # A split list in the public code's form (paths relative to leftImg8bit/<split>).
    lst = tmp_path / "val_list.txt"
    lst.write_text("bremen/bremen_000000_000019_leftImg8bit.png\n\n")
    assert [it["name"] for it in Cityscapes(str(root), "val", list_file=str(lst))] == \
        ["bremen/bremen_000000_000019_leftImg8bit.png"]


def test_gta5_and_synthia(tmp_path):
    gta = tmp_path / "gta5"
    raw = all_raw_ids(9, 14, seed=3)
    save_rgb(str(gta / "images/00001.png"), 9, 14)
    save_gray(str(gta / "labels/00001.png"), raw)
    item = GTA5(str(gta))[0]
    assert np.array_equal(item["label"].numpy(), expected(raw, LABELID_TO_19))

    syn = tmp_path / "synthia"
    ids = all_raw_ids(8, 11, high=25, seed=4)
    label = np.zeros((8, 11, 3), dtype=np.uint16)
    label[..., 0] = ids
    label[..., 1] = 1000 + ids  # the instance channel: must be ignored
    label[0, 0, 0] = 300  # a 16-bit id no table knows -> ignore
    save_png16_rgb(str(syn / "GT/LABELS/0000000.png"), label)
    save_rgb(str(syn / "RGB/0000000.png"), 8, 11)
    got = Synthia(str(syn))[0]["label"].numpy()
    want = expected(label[..., 0], SYNTHIA_TO_16)
    assert want[0, 0] == 255 and np.array_equal(got, want)


def test_cross_city_test_and_train_splits(tmp_path):
    root = tmp_path / "NTHU"
    raw = all_raw_ids(6, 7, seed=5)
    save_rgb(str(root / "Rome/Images/Test/pic_001.png"), 6, 7)
    save_gray(str(root / "Rome/Labels/Test/pic_001_eval.png"), raw)
    save_rgb(str(root / "Rome/Images/Train/pic_900.jpg"), 6, 7)
    table = {7: 0, 8: 1, 11: 2, 19: 3, 20: 4, 21: 5, 23: 6, 24: 7, 25: 8, 26: 9, 28: 10, 32: 11, 33: 12}
    assert np.array_equal(CrossCity(str(root), "Rome")[0]["label"].numpy(), expected(raw, table))
    train = CrossCity(str(root), "Rome", "train")
    assert len(train) == 1 and "label" not in train[0]


def test_labelled_folder_with_ids_and_with_colours(tmp_path):
    images, labels = tmp_path / "sim/rgb", tmp_path / "sim/seg"
    save_rgb(str(images / "town1/f0.png"), 5, 6)
    raw = np.array([[0, 1, 2, 9, 1, 0]] * 5)
    save_gray(str(labels / "town1/f0_seg.png"), raw)
    mapping = tmp_path / "map.yaml"
    mapping.write_text("classes: [road, car, person]\nids: {1: road, 2: 1, 9: person}\nlabel_suffix: _seg.png\n")
    ds = LabelledFolder(str(images), str(labels), str(mapping))
    assert ds.label_space.class_names == ("road", "car", "person")
    assert ds[0]["name"] == "town1/f0.png"
    assert ds[0]["label"][0].tolist() == [255, 0, 1, 2, 0, 255]

    colours = np.zeros((5, 6, 3), dtype=np.uint8)
    colours[:, :3] = (128, 64, 128)
    colours[:, 3] = (0, 0, 142)
    Image.fromarray(colours).save(labels / "town1/f0_seg.png")
    cmap = tmp_path / "colours.yaml"
    cmap.write_text("label_space: cityscapes19\ncolors: {'128,64,128': road, '0,0,142': car}\nlabel_suffix: _seg.png\n")
    row = LabelledFolder(str(images), str(labels), str(cmap))[0]["label"][0].tolist()
    assert row == [0, 0, 0, 13, 255, 255]
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: [road]\nids: {1: tree}\n")
    with pytest.raises(ValueError, match="unknown class 'tree'"):
        LabelledFolder(str(images), str(labels), str(bad))


def test_image_folder_recursive_skips_corrupt_frames(tmp_path):
    root = tmp_path / "frames"
    save_rgb(str(root / "a/0001.jpg"), 4, 5)
    save_rgb(str(root / "a/b/0002.png"), 4, 5)
    (root / "a/b/0003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # truncated
    (root / "notes.txt").write_text("not an image")
    ds = ImageFolder(str(root))
    assert ds.names == ["a/0001.jpg", "a/b/0002.png", "a/b/0003.png"]
    with pytest.warns(RuntimeWarning, match="0003.png"):
        item = ds[2]
    # Skipped, never replaced by another frame: a pass over the set sees each readable frame once.
    assert "image" not in item and item["skipped"] == ["a/b/0003.png"] and ds.failures[0][0] == "a/b/0003.png"
    with pytest.warns(RuntimeWarning):
        batch = collate([ds[0], ds[2], ds[1]])
    assert batch["name"] == ["a/0001.jpg", "a/b/0002.png"] and batch["image"].shape[0] == 2
    assert batch["skipped"] == ["a/b/0003.png"] and has_images(batch)
    with pytest.warns(RuntimeWarning):
        assert not has_images(collate([ds[2]]))
    with pytest.raises(CorruptImageError, match="0003.png"):
        ImageFolder(str(root), on_error="raise")[2]


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="GTA5 folder not found"):
        GTA5(str(tmp_path / "nowhere"))
    gta = tmp_path / "gta5"
    save_rgb(str(gta / "images/00001.png"), 6, 6)
    save_rgb(str(gta / "images/00002.png"), 6, 6)
    save_gray(str(gta / "labels/00001.png"), np.zeros((6, 6)))
    os.makedirs(gta / "labels", exist_ok=True)
    with pytest.raises(FileNotFoundError, match="00002.png has no label: expected .*labels/00002.png"):
        GTA5(str(gta))
    # A label of another size (a known GTA5 quirk) is resized to its image, nearest, and the pair named.
    rows = np.repeat(np.array([7, 26, 7, 26, 7])[:, None], 6, axis=1)  # labelIds: road, car per row
    save_gray(str(gta / "labels/00002.png"), rows)
    with pytest.warns(RuntimeWarning, match="label .*00002.png is 6x5 but its image .*00002.png is 6x6"):
        item = GTA5(str(gta))[1]
    assert item["mismatched"] == ["00002.png"] and tuple(item["label"].shape) == (6, 6)
    nearest = np.array(Image.fromarray(rows.astype(np.uint8)).resize((6, 6), Image.NEAREST))
    assert np.array_equal(item["label"].numpy(), np.where(nearest == 7, 0, 13))  # road -> 0, car -> 13
    save_gray(str(gta / "labels/00002.png"), np.zeros((6, 6)))
    (gta / "images/00002.png").write_bytes((gta / "images/00002.png").read_bytes()[:60])
    with pytest.raises(CorruptImageError, match="00002.png"):
        GTA5(str(gta))[1]
    with pytest.warns(RuntimeWarning, match="00002.png"):
        assert GTA5(str(gta), on_error="skip")[1]["skipped"] == ["00002.png"]
    lst = tmp_path / "list.txt"
    lst.write_text("00001.png\n00009.png\n")
    with pytest.raises(FileNotFoundError, match="00009.png"):
        GTA5(str(gta), list_file=str(lst))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(str(tmp_path / "empty"))


def test_transforms_keep_image_and_label_aligned(tmp_path):
    """Crop and flip move image and label together: encode each pixel's column in both and compare."""
    h, w = 20, 30
    cols = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    image = np.stack([cols * 8, cols * 8, cols * 8], axis=-1).astype(np.uint8)
    transform = build_transform(crop=(12, 9), flip=True)
    for seed in range(10):
        torch.manual_seed(seed)
        import random
        random.seed(seed)
        out = transform({"image": image.copy(), "label": cols.copy()})
        assert out["image"].shape == (3, 9, 12) and out["label"].shape == (9, 12)
        assert torch.equal((out["image"][0] * 255).round().long() // 8, out["label"])
    scaled = build_transform(size=(15, 10))({"image": image.copy(), "label": cols.copy()})
    assert scaled["image"].shape == (3, 10, 15) and scaled["label"].shape == (10, 15)
    assert set(scaled["label"].unique().tolist()) <= set(range(w))  # nearest: no invented label values
    jittered = build_transform(jitter=True, grayscale=1.0, blur=True)({"image": image.copy()})
    assert jittered["image"].shape == (3, h, w) and 0 <= float(jittered["image"].min()) <= float(
        jittered["image"].max()) <= 1
    batch = collate([scaled, scaled])
    assert batch["image"].shape == (2, 3, 10, 15) and batch["label"].shape == (2, 10, 15)


def test_trainid_to_labelid_round_trip():
    train = np.arange(19, dtype=np.uint8).reshape(1, 19)
    label_ids = trainid_to_labelid(train)
    assert np.array_equal(expected(label_ids, LABELID_TO_19), train)
    assert trainid_to_labelid(np.array([[255]], dtype=np.uint8))[0, 0] == 0
