"""`sdca demo --quick` end to end: every stage, a report, a valid ONNX model, inference outputs."""
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from sdca.data.synthdrive import GENERATOR_VERSION
from sdca.engine.demo import run_demo


def test_demo_quick_writes_a_complete_report(tmp_path):
    out = tmp_path / "demo"
    path = run_demo(str(out), quick=True, progress=False)
    report = Path(path).read_text()
    for row in ("source-only", "SDCA (adapt)", "SDCA + self-training", "**mIoU**", GENERATOR_VERSION):
        assert row in report, row
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["source-only", "SDCA (adapt)", "SDCA + self-training"]
    assert all(0.0 <= r["mIoU"] <= 1.0 and r["images"] == 12 for r in results.values())
    for stage, name in (("source", "final.pt"), ("init-stats", "final.pt"), ("adapt", "final.pt"),
                        ("pseudo-label", "thresholds.json"), ("self-train", "final.pt")):
        assert (out / stage / name).is_file(), stage
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = dict(session.get_modelmeta().custom_metadata_map)
    assert len(json.loads(meta["class_names"])) == 19 and meta["output"] == "logits"
    logits = session.run(None, {"image": np.zeros((1, 3, 128, 256), np.float32)})[0]
    assert logits.shape == (1, 19, 128, 256) and np.isfinite(logits).all()
    summary = json.loads((out / "infer" / "summary.json").read_text())
    assert summary["frames"] == 8 and not summary["failures"]
    assert len(os.listdir(out / "infer" / "overlay")) == 8
    grid = Image.open(out / "qualitative.png")
    assert grid.size == (5 * 256, 4 * 128)  # input, ground truth, three models; four frames
    with Image.open(out / "curves.png") as curves:  # matplotlib: losses, and the adaptation gradient shares
        assert curves.format == "PNG" and curves.size == (990, 704)
    # `sdca inspect` on the source-only and adapted models, side by side in the report.
    assert "## Is adaptation working?" in report and "Mahalanobis gap" in report
    for stage in ("init-stats", "adapt"):
        inspected = json.loads((out / "inspect" / stage / "inspect.json").read_text())
        assert inspected["frames"] == {"source": 12, "target": 12} and "alignment" in inspected
        assert "with_labels" in inspected and not inspected["skipped"]
        assert f"inspect/{stage}/classes.png" in report
