"""Every stage on tiny fabricated data with the small backbone; resume; non-finite stop; pseudo-label medians."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sdca.engine import Runner, load_config
from sdca.engine.loop import NonFiniteLoss
from sdca.models import read_checkpoint

from .checks import assert_same_training_state


def run(config, **changes):
    cfg = load_config(None, [], **{**config, **changes})
    runner = Runner(cfg, progress=False)
    return runner, runner.train()


def test_all_stages_write_their_outputs(tiny_data):
    tmp, config = tiny_data
    runner, result = run(config)
    run_dir = tmp / "runs" / "tiny"
    for stage in ("source", "adapt", "self-train"):
        for name in ("last.pt", "final.pt", "best.pt"):
            assert (run_dir / stage / name).is_file(), f"{stage}/{name}"
    stats = read_checkpoint(str(run_dir / "init-stats" / "final.pt"))["statistics"]
    assert stats["features"]["covariance"].shape == (19, 64, 64)  # full covariance, A = 8 x width
    assert int(stats["features"]["count"].sum()) == 6 * 4 * 8  # every stride-8 pixel of the 6 source frames
    adapt = read_checkpoint(str(run_dir / "adapt" / "final.pt"))
    assert adapt["step"] == 3 and int(adapt["statistics"]["features"]["count"].sum()) > 6 * 4 * 8
    thresholds = json.loads((run_dir / "pseudo-label" / "thresholds.json").read_text())
    assert thresholds["images"] == 6 and 0 <= thresholds["ignored_share"] <= 1
    label = np.array(Image.open(run_dir / "pseudo-label" / "seq0" / "f000.png"))
    assert label.shape == (32, 64) and set(np.unique(label)) <= set(range(19)) | {255}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert {r["stage"] for r in evals} == {"source", "adapt", "self-train"}
    assert all(0 <= r["eval"]["mIoU"] <= 1 for r in evals)
    assert (run_dir / "config.yaml").is_file() and "tiny" in (run_dir / "config.yaml").read_text()
    # Rerunning skips every finished stage.
    _, again = run(config)
    assert again["seconds"] < result["seconds"] + 5


def test_source_loss_falls_on_a_fixed_batch(tiny_data):
    from sdca.data import collate
    from sdca.engine.builders import build_dataset, build_optimizer
    from sdca.engine.distributed import DistInfo
    from sdca.engine.recipe import stage_transform
    from sdca.engine.steps import SupervisedStep
    from sdca.models import build_model

    tmp, config = tiny_data
    cfg = load_config(None, [], **config)
    torch.manual_seed(0)
    model = build_model("deeplabv2_small", 19, width=8)
    dataset = build_dataset(cfg.data.source, 19, stage_transform(cfg, "source"))
    batch = collate([dataset[0], dataset[1]])
    optimizer = build_optimizer(model, cfg.solver, cfg.solver.source)

    class Same:
        def __next__(self):
            return batch
    step = SupervisedStep(model, optimizer, Same(), torch.device("cpu"), None, DistInfo(), 0.75)
    losses = [step.run_step(i)["loss_ce"] for i in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def test_resume_equals_uninterrupted(tiny_data):
    """k steps, stop (the state a kill after the step-k checkpoint leaves), resume for k more == 2k steps."""
    tmp, config = tiny_data
    base = dict(config)
    base["stages"] = ["source", "init-stats", "adapt"]
    base["solver"] = {**config["solver"], "adapt": {"iters": 4, "lr": 0.005, "schedule_iters": 4},
                      "checkpoint_period": 2}
    run(base, name="straight")
    interrupted = dict(base)
    interrupted["solver"] = {**base["solver"], "adapt": {"iters": 2, "lr": 0.005, "schedule_iters": 4}}
    run(interrupted, name="resumed")
    adapt = tmp / "runs" / "resumed" / "adapt"
    os.remove(adapt / "final.pt")  # as if killed right after the step-2 checkpoint
    assert read_checkpoint(str(adapt / "last.pt"))["step"] == 2
    run(base, name="resumed")
    a = read_checkpoint(str(tmp / "runs" / "straight" / "adapt" / "final.pt"))
    b = read_checkpoint(str(adapt / "final.pt"))
    assert a["step"] == b["step"] == 4
    assert_same_training_state(a, b)
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(group_b["momentum_buffer"], group_a["momentum_buffer"], rtol=1e-5, atol=1e-6)


def test_non_finite_loss_stops_with_the_step_and_term(tiny_data, monkeypatch):
    import sdca.engine.steps as steps

    tmp, config = tiny_data
    calls = {"n": 0}
    real = steps.lovasz_softmax

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value
    monkeypatch.setattr(steps, "lovasz_softmax", poisoned)
    with pytest.raises(NonFiniteLoss, match="loss_lovasz is nan at step 3"):
        run(config, stages=["source"])
    last = read_checkpoint(str(tmp / "runs" / "tiny" / "source" / "last.pt"))
    assert last["step"] == 2  # the last good checkpoint is kept
    assert all(torch.isfinite(v).all() for v in last["model"]["state_dict"].values() if v.is_floating_point())
    assert not (tmp / "runs" / "tiny" / "source" / "final.pt").exists()


def _as_cityscapes(tmp, images):
    """The same frames in Cityscapes' layout: leftImg8bit/train/{city}/{name}_leftImg8bit.png."""
    root = tmp / "cityscapes"
    for path in sorted(images.rglob("*.png")):
        city = path.parent.name
        out = root / "leftImg8bit" / "train" / city / f"{path.stem}_leftImg8bit.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(path.read_bytes())
    return root


@pytest.mark.parametrize("kind", ["images", "cityscapes"])
def test_a_truncated_target_frame_is_skipped_by_every_stage(tiny_data, kind):
    """adapt, pseudo-label and self-train finish on a target set with one truncated frame; each stage lists it
    once in metrics.jsonl; the Eq. 19 medians count every readable frame exactly once; no label map is written
    for it."""
    tmp, config = tiny_data
    images = tmp / "real" / "images"
    bad = images / "seq1" / "f001.png"
    bad.write_bytes(bad.read_bytes()[:80])
    if kind == "cityscapes":
        config["data"]["target"] = {"kind": "cityscapes", "root": str(_as_cityscapes(tmp, images)), "labelled": False}
        bad_name = "seq1/f001_leftImg8bit.png"
    else:
        bad_name = "seq1/f001.png"
    run(config, stages=["source", "init-stats", "adapt", "pseudo-label", "self-train"])
    records = [json.loads(line) for line in (tmp / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    listed = {r["stage"]: r["unreadable_frames"] for r in records if "unreadable_frames" in r}
    # 3 adapt steps of 2 frames consume one permutation of the 6 target frames, so adapt meets it too.
    assert listed == {"source": [], "init-stats": [], "adapt": [bad_name], "pseudo-label": [bad_name],
                      "self-train": [bad_name]}
    assert (tmp / "runs" / "tiny" / "self-train" / "final.pt").exists()
    report = json.loads((tmp / "runs" / "tiny" / "pseudo-label" / "thresholds.json").read_text())
    assert report["images"] == 5 and report["unreadable"] == [bad_name]
    assert sum(report["predicted_pixels"].values()) == 5 * 32 * 64  # each readable frame once, at its size
    written = sorted(p.relative_to(tmp / "runs" / "tiny" / "pseudo-label").as_posix()
                     for p in (tmp / "runs" / "tiny" / "pseudo-label").rglob("*.png"))
    assert len(written) == 5 and bad_name.replace(".png", "") + ".png" not in written


def test_pseudo_label_thresholds_are_the_brute_force_medians(tiny_data):
    from sdca.data import ImageFolder
    from sdca.engine import generate_pseudo_labels
    from sdca.engine.evaluator import predict_probabilities
    from sdca.models import build_model

    tmp, config = tiny_data
    torch.manual_seed(0)
    model = build_model("deeplabv2_small", 19, width=8).eval()
    dataset = ImageFolder(str(tmp / "real" / "images"))
    out = tmp / "pl"
    report = generate_pseudo_labels(model, dataset, str(out), device=torch.device("cpu"), size=(48, 24), cap=0.9,
                                    progress=False)
    confs, preds, probs_all = [], [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            image = dataset[i]["image"][None]
            probs, _ = predict_probabilities(model, image, image.shape[-2:], (48, 24))
            c, p = probs.max(1)
            confs.append(c.flatten())
            preds.append(p.flatten())
            probs_all.append((dataset[i]["name"], c[0], p[0]))
    conf, pred = torch.cat(confs), torch.cat(preds)
    for k, name in enumerate(model.info.class_names):
        values = sorted(conf[pred == k].tolist())
        expected = min(values[(len(values) - 1) // 2], 0.9) if values else 0.0
        assert report["thresholds"][name] == pytest.approx(expected, abs=0.0), name
    thresholds = torch.tensor([report["thresholds"][n] for n in model.info.class_names])
    for name, c, p in probs_all:
        written = np.array(Image.open(out / (os.path.splitext(name)[0] + ".png")))
        expected = torch.where(c >= thresholds[p], p, torch.full_like(p, 255)).numpy()
        assert np.array_equal(written, expected)


def test_bf16_autocast_on_the_cpu(tiny_data):
    tmp, config = tiny_data
    run(config, amp="bf16", stages=["source", "init-stats", "adapt"])
    records = [json.loads(line) for line in (tmp / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    adapt = [r for r in records if r.get("stage") == "adapt" and r.get("done")][0]
    assert all(np.isfinite(v) for v in adapt["losses"].values())
    assert {"loss_ce", "loss_lovasz", "loss_feat", "loss_out"} <= set(adapt["losses"])


def test_a_gta5_pair_of_different_sizes_trains_and_is_reported(tiny_data):
    """The public loaders resize image and label independently, so GTA5's few mismatched pairs train; so do
    ours (label resized to its image, nearest), and the pair is listed in metrics.jsonl."""
    tmp, config = tiny_data
    gta = tmp / "gta5"
    (gta / "images").mkdir(parents=True)
    (gta / "labels").mkdir(parents=True)
    pairs = sorted((tmp / "sim" / "images").rglob("*.png"))
    for i, image in enumerate(pairs):
        (gta / "images" / f"{i:05d}.png").write_bytes(image.read_bytes())
        label = Image.open(tmp / "sim" / "labels" / image.relative_to(tmp / "sim" / "images"))
        if i == 3:
            label = label.resize((60, 30), Image.NEAREST)
        label.save(gta / "labels" / f"{i:05d}.png")
    config["data"]["source"] = {"kind": "gta5", "root": str(gta)}
    config["solver"]["source"]["iters"] = 3  # 3 steps of 2 frames: one permutation of the 6 pairs
    with pytest.warns(RuntimeWarning, match="00003.png is 60x30 but its image"):
        run(config, stages=["source"])
    records = [json.loads(line) for line in (tmp / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mismatched_pairs"] for r in records if "mismatched_pairs" in r] == [["00003.png"]]
    assert (tmp / "runs" / "tiny" / "source" / "final.pt").exists()


def test_each_stage_draws_its_own_sample_order(tiny_data):
    """Adaptation must not replay the warm-up's source sequence (both used to seed the stream identically)."""
    from sdca.engine.builders import build_dataset

    tmp, config = tiny_data
    runner = Runner(load_config(None, [], **config), progress=False)
    source = build_dataset(runner.cfg.data.source, 19)
    orders = {}
    for stage in ("source", "adapt", "self-train"):
        stream = runner._streams(stage, {}, runner.cfg.solver.source, source=source)["source"]
        orders[stage] = [name for _ in range(3) for name in next(stream)["name"]]
    assert sorted(orders["source"]) == sorted(orders["adapt"])  # one permutation of the same 6 frames each
    assert orders["source"] != orders["adapt"] and orders["adapt"] != orders["self-train"]


def test_a_per_stage_recipe_runs_every_stage(tiny_data):
    """The paper presets' machinery on tiny data: per-stage batches and augmentation, class-balanced source
    sampling (its class table cached beside the labels), bicubic resizing, raw-scale self-training with trained
    batch norm, and the public selection of the best val checkpoint between stages."""
    tmp, config = tiny_data
    config["model"]["bn"] = "frozen"
    config["data"].update(resize="bicubic", stages={
        "source": {"batch_size": 3, "jitter": False, "grayscale": 0.0, "blur": False, "sampling": "class_balanced"},
        "adapt": {"batch_size": 1, "target_batch_size": 2, "sampling": "class_balanced"},
        "self_train": {"batch_size": 2, "scale": [0.5, 1.5], "scale_base": "raw", "crop": [48, 24]}})
    config["solver"]["select"] = "best"
    config["method"]["self_train_bn"] = "train"
    run(config)
    folder = tmp / "runs" / "tiny"
    assert (folder / "self-train" / "final.pt").exists()
    assert len(list((tmp / "sim" / "labels").glob("class_sets-*.json"))) == 1
    assert read_checkpoint(str(folder / "self-train" / "final.pt"))["model"]["info"]["bn"] == "train"


def test_the_uint8_pipeline_trains_like_the_float_one(tiny_data):
    """data.pipeline=uint8 (the GPU's loader: uint8 frames, photometric augmentation applied in the step) on the
    CPU: every stage runs, and the first source step's losses match the float pipeline's up to the rounding."""
    tmp, config = tiny_data
    records = {}
    for pipeline in ("float", "uint8"):
        run(config, name=pipeline, stages=["source", "init-stats", "adapt"],
            data={**config["data"], "pipeline": pipeline, "stages": {"source": {"jitter": True, "blur": True}}})
        lines = [json.loads(x) for x in (tmp / "runs" / pipeline / "metrics.jsonl").read_text().splitlines()]
        records[pipeline] = [r for r in lines if r.get("stage") == "source" and r.get("step") == 1][0]
        assert (tmp / "runs" / pipeline / "adapt" / "final.pt").is_file()
    for term in ("loss_ce", "loss_lovasz"):
        assert records["uint8"][term] == pytest.approx(records["float"][term], rel=1e-2), term


def test_channels_last_trains_the_same_model(tiny_data):
    """speed.channels_last changes the memory layout only: the weights after a few steps agree with the default
    layout's to float round-off."""
    tmp, config = tiny_data
    for name, on in (("nchw", False), ("nhwc", True)):
        run(config, name=name, stages=["source"], speed={"channels_last": on})
    a = read_checkpoint(str(tmp / "runs" / "nchw" / "source" / "final.pt"))["model"]["state_dict"]
    b = read_checkpoint(str(tmp / "runs" / "nhwc" / "source" / "final.pt"))["model"]["state_dict"]
    for key, value in a.items():
        torch.testing.assert_close(b[key].contiguous(), value, rtol=1e-4, atol=1e-5, msg=key)
