"""`evaluate` against the official Cityscapes evaluation (cityscapesscripts) on the same prediction PNGs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdca.data import Cityscapes
from sdca.data.labels import CITYSCAPES
from sdca.engine import evaluate
from sdca.models import ModelInfo, Normalization, SegmentationOutput

# Raw Cityscapes labelIds with meaning: the 19 evaluated ones, and some the evaluation ignores (0, 1, 4, 9, 30).
EVAL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
IGNORED_IDS = [0, 1, 4, 9, 30]


def write_cityscapes_val(root, n=3, h=48, w=84, seed=0):
    """Ground truth in blocks of labelIds; the image's red channel paints each pixel's trainId (x 12)."""
    rng = np.random.default_rng(seed)
    to_train = {lid: t for t, lid in enumerate(EVAL_IDS)}
    for i in range(n):
        city = ["frankfurt", "lindau", "munster"][i % 3]
        stem = f"{city}_{i:06d}_000019"
        img_dir, gt_dir = root / "leftImg8bit" / "val" / city, root / "gtFine" / "val" / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        ids = np.array(EVAL_IDS[:12] + IGNORED_IDS)[rng.integers(0, 17, (h // 6, w // 6))]
        ids = np.kron(ids, np.ones((6, 6), dtype=np.int64)).astype(np.uint8)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[..., 0] = np.vectorize(lambda v: 12 * to_train.get(int(v), 20))(ids)
        Image.fromarray(image).save(img_dir / f"{stem}_leftImg8bit.png")
        Image.fromarray(ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")


class PaintedLabels(torch.nn.Module):
    """Stand-in segmenter: stride-8 logits from the trainIds painted into the red channel, plus noise.

    The evaluation pipeline (resize, upsample, argmax, labelId export, confusion) is what is under test; the
    predictions come out blocky and partly wrong, which is what a comparison needs.
    """

    def __init__(self):
        super().__init__()
        self.info = ModelInfo("stand-in", 19, list(CITYSCAPES.class_names), list(CITYSCAPES.palette),
                              Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
        self.num_classes = 19

    def forward(self, x):
        cls = (x[:, 0] * 255 / 12).round().long().clamp(0, 19)
        onehot = F.one_hot(cls, 20)[..., :19].permute(0, 3, 1, 2).float()
        logits = F.avg_pool2d(onehot, 8, 8, ceil_mode=True) * 4
        logits = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
        return SegmentationOutput(logits, logits)


def test_miou_matches_cityscapesscripts(tmp_path, monkeypatch):
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path / "cityscapes"))
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    root = tmp_path / "cityscapes"
    write_cityscapes_val(root)
    model = PaintedLabels()
    dataset = Cityscapes(str(root), "val")
    preds = tmp_path / "results"
    ours = evaluate(model, dataset, device=torch.device("cpu"), save_dir=str(preds), labelid_png=True,
                    progress=False)
    pred_files, gt_files = [], []
    for name, label_path in dataset.items:
        pred_files.append(str(preds / name))
        gt_files.append(label_path)
    args = ev.args
    args.evalInstLevelScore = False
    args.JSONOutput = False
    args.quiet = True
    result = ev.evaluateImgLists(pred_files, gt_files, args)
    scored = [v for v in ours["IoU"].values() if v is not None]
    assert len(scored) >= 10 and 0.05 < ours["mIoU"] < 0.95  # a comparison with substance
    assert abs(ours["mIoU"] - result["averageScoreClasses"]) < 1e-6
    for name, mine in ours["IoU"].items():
        score = result["classScores"][name]
        if np.isnan(score):
            assert mine is None, name
        else:
            assert abs(mine - score) < 1e-6, name
