"""`sdca inspect` on the tiny fabricated scenes: numbers against a brute force, report with and without target
labels, valid figures, skipped diagnostics for a model without statistics, bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sdca.engine import Runner, load_config
from tests.common_utils import run_sdca

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A source model (no statistics) and its init-stats checkpoint (with them), and a YAML config of the data."""
    from tests.common_utils import write_tree

    tmp = tmp_path_factory.mktemp("inspect")
    mapping = tmp / "mapping.yaml"
    mapping.write_text("label_space: cityscapes19\nids: {7: road, 11: building, 23: sky, 26: car}\n")
    write_tree(str(tmp / "sim"), 6, 32, 64, real=False, seed=0)
    write_tree(str(tmp / "realval"), 4, 32, 64, real=True, seed=2)
    folder = lambda name: {"kind": "folder", "root": str(tmp / name / "images"),  # noqa: E731
                           "labels": str(tmp / name / "labels"), "mapping": str(mapping)}
    config = {"name": "tiny", "output_dir": str(tmp / "runs"), "device": "cpu", "seed": 3,
              "model": {"arch": "deeplabv2_small", "num_classes": 19, "width": 8, "bn": "train"},
              "data": {"source": folder("sim"), "target": {"kind": "images", "root": str(tmp / "realval" / "images")},
                       "val": folder("realval"), "source_size": [64, 32], "target_size": [64, 32], "batch_size": 2,
                       "workers": 0},
              "solver": {"source": {"iters": 4, "lr": 0.01}, "checkpoint_period": 2, "log_period": 1},
              "method": {"variant": "paper", "covariance": "full", "delta": 0.5}}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump({k: v for k, v in config.items() if k in ("model", "data")}))
    runner = Runner(load_config(None, [], **config), progress=False)
    runner.train(["source", "init-stats"])
    return tmp, runner.final_path("source"), runner.final_path("init-stats")


def _sdca(*args):
    return run_sdca(*args, module=True, timeout=900)


def _valid_png(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_inspect_with_target_labels_against_brute_force(trained):
    from sdca.data import build_transform
    from sdca.engine.builders import build_dataset
    from sdca.models import load_model, upsample_logits

    tmp, _, stats_ckpt = trained
    out = tmp / "out_labels"
    run = _sdca("inspect", stats_ckpt, "--source", f"{tmp}/cfg.yaml:source", "--target", f"{tmp}/cfg.yaml:val",
                "--target-labels", "--out", str(out), "--frames", "10", "--quiet", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    r = json.loads(Path(out / "inspect.json").read_text())
    assert r["frames"] == {"source": 6, "target": 4} and r["skipped"] == []
    for name in ("classes", "alignment", "confusion", "features"):
        _valid_png(out / r["figures"][name])
    md = (out / "inspect.md").read_text()
    assert "Eq.5 prec" in md and "Mahal. tgt" in md and "![features](features.png)" in md

    # Brute force: predictions of the 4 labelled target frames one by one, with NumPy counting.
    cfg = load_config(str(tmp / "cfg.yaml"))
    val = build_dataset(cfg.data.val, 19, build_transform(size=(64, 32)))
    model = load_model(stats_ckpt)
    conf, pred, truth = [], [], []
    with torch.no_grad():
        for i in range(len(val)):
            item = val[i]
            logits = model(model.info.normalization(item["image"][None])).logits
            p = torch.softmax(upsample_logits(logits, item["image"].shape[-2:]), 1)[0].numpy()
            conf.append(p.max(0).ravel())
            pred.append(p.argmax(0).ravel())
            truth.append(item["label"].numpy().ravel())
    conf, pred, truth = map(np.concatenate, (conf, pred, truth))
    shares = np.bincount(pred, minlength=19) / pred.size
    np.testing.assert_allclose(r["per_class"]["target_predicted_share"], shares, atol=1e-9)
    pc, wl = r["per_class"], r["with_labels"]
    for c in np.unique(pred):
        sel = pred == c
        assert pc["target_mean_confidence"][c] == pytest.approx(conf[sel].mean(), rel=1e-5)
        assert pc["eq5_pass_share"][c] == pytest.approx((conf[sel] >= 0.5).mean(), rel=1e-9)
        kept = sel & (conf >= 0.5) & (truth != 255)
        if kept.any():
            assert wl["eq5_precision"][c] == pytest.approx((truth[kept] == c).mean(), rel=1e-9)
    valid = truth != 255
    confusion = np.zeros((19, 19), dtype=np.int64)
    np.add.at(confusion, (truth[valid], pred[valid]), 1)
    assert np.array_equal(np.asarray(wl["confusion"]), confusion)
    src_shares = np.asarray(r["per_class"]["source_label_share"])
    assert src_shares.sum() == pytest.approx(1.0) and src_shares[[0, 2, 10, 13]].sum() == pytest.approx(1.0)


def test_inspect_without_statistics_or_target_labels(trained):
    tmp, source_ckpt, _ = trained
    out = tmp / "out_plain"
    run = _sdca("inspect", source_ckpt, "--source", f"{tmp}/cfg.yaml:source", "--target",
                str(tmp / "realval" / "images"), "--out", str(out), "--frames", "3", "--quiet", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "skipped: alignment" in run.stdout
    r = json.loads(Path(out / "inspect.json").read_text())
    assert r["frames"]["target"] == 3 and "alignment" not in r and "with_labels" not in r
    assert any("PDD" in s for s in r["skipped"])
    assert set(r["figures"]) == {"classes", "features"}
    assert "Skipped:" in (out / "inspect.md").read_text()


def test_inspect_bad_input(trained, tmp_path):
    from sdca.models import build_model, save_checkpoint

    tmp, source_ckpt, _ = trained
    sixteen = tmp_path / "k16.pt"
    save_checkpoint(str(sixteen), build_model("deeplabv2_small", 16, width=4))
    run = _sdca("inspect", str(sixteen), "--source", f"{tmp}/cfg.yaml:source", "--target", f"{tmp}/cfg.yaml:val",
                "--out", str(tmp_path / "o"))
    assert run.returncode != 0 and "classes" in run.stderr and "predicts 16" in run.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    run = _sdca("inspect", source_ckpt, "--source", f"{tmp}/cfg.yaml:source", "--target", str(empty))
    assert run.returncode == 2 and "--target" in run.stderr
    run = _sdca("inspect", source_ckpt, "--source", str(tmp / "realval" / "images"), "--target", str(empty))
    assert run.returncode != 0
    run = _sdca("inspect", source_ckpt, "--source", f"{tmp}/cfg.yaml:source", "--target",
                str(tmp / "realval" / "images"), "--target-labels", "--out", str(tmp_path / "o2"))
    assert run.returncode == 1 and "no labels" in run.stderr


def test_inspect_reads_real_layouts_given_by_kind_and_root(trained, tmp_path):
    """--source-data gta5 / --target-data cityscapes on the same frames in those data sets' own layouts give the
    report the YAML entries (a labelled folder with a labelId mapping) give."""
    import shutil

    tmp, _, stats_ckpt = trained
    gta = tmp_path / "GTA5"
    for sub in ("images", "labels"):
        (gta / sub).mkdir(parents=True)
        for i, path in enumerate(sorted((tmp / "sim" / sub).rglob("*.png"))):
            shutil.copy(path, gta / sub / f"{i:05d}.png")
    city = tmp_path / "cityscapes"
    for i, path in enumerate(sorted((tmp / "realval" / "images").rglob("*.png"))):
        stem = f"{path.parent.name}_000000_{i:06d}"
        label = tmp / "realval" / "labels" / path.parent.name / path.name
        for top, suffix, src in (("leftImg8bit", "leftImg8bit", path), ("gtFine", "gtFine_labelIds", label)):
            (city / top / "val" / "aachen").mkdir(parents=True, exist_ok=True)
            shutil.copy(src, city / top / "val" / "aachen" / f"{stem}_{suffix}.png")

    common = ["--target-labels", "--frames", "10", "--quiet", "--device", "cpu"]
    by_kind = _sdca("inspect", stats_ckpt, "--source-data", "gta5", "--source-root", str(gta), "--target-data",
                    "cityscapes", "--target-root", str(city), "--out", str(tmp_path / "by_kind"), *common)
    assert by_kind.returncode == 0, by_kind.stderr
    by_entry = _sdca("inspect", stats_ckpt, "--source", f"{tmp}/cfg.yaml:source", "--target", f"{tmp}/cfg.yaml:val",
                     "--out", str(tmp_path / "by_entry"), *common)
    assert by_entry.returncode == 0, by_entry.stderr
    a, b = (json.loads(Path(tmp_path / name / "inspect.json").read_text()) for name in ("by_kind", "by_entry"))
    assert a["frames"] == b["frames"] == {"source": 6, "target": 4}
    for key in ("source_label_share", "target_predicted_share", "eq5_pass_share"):
        np.testing.assert_allclose(np.array(a["per_class"][key], dtype=float),
                                   np.array(b["per_class"][key], dtype=float), atol=1e-9)  # None (no pixel) -> nan
    assert a["with_labels"]["confusion"] == b["with_labels"]["confusion"]

    both = _sdca("inspect", stats_ckpt, "--source", f"{tmp}/cfg.yaml:source", "--source-data", "gta5",
                 "--source-root", str(gta), "--target", str(city))
    assert both.returncode == 2 and "not both" in both.stderr
    neither = _sdca("inspect", stats_ckpt, "--source-data", "gta5", "--target", str(city))
    assert neither.returncode == 2 and "--source-root" in neither.stderr
