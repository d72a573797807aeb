"""The kernel benchmark runs every case end to end (tiny sizes) and reports each target it is held to.

Speed itself is never asserted here: targets live in the benchmark's own output.
"""
import json
import os
import subprocess
import sys

import pytest

from sdca import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not ops.has_ops(), reason="the benchmark compares the compiled extension with its baselines")
def test_benchmark_quick_run(tmp_path):
    out_json = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_kernels.py"), "--quick", "--repeat", "1",
                          "--json", str(out_json)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out_json.read_text())
    assert {(r["case"], r["baseline"], r["ours"]) for r in rows} == {
        ("diag_loss", "public", "sdca"), ("diag_api", "bare", "sdca"), ("full_loss", "products", "sdca"),
        ("full_loss", "einsum", "sdca"),
        ("stats_diag", "public", "sdca"), ("stats_diag", "public", "reference"), ("stats_full", "gram", "sdca")}
    for r in rows:
        assert r["baseline_result"]["time_s"] > 0 and r["ours_result"]["time_s"] > 0
        assert r["speedup"] == pytest.approx(r["baseline_result"]["time_s"] / r["ours_result"]["time_s"])
    assert "stats_full" in run.stdout and "target" in run.stdout


def test_quantization_benchmark_runs_on_a_demo_shaped_folder(tmp_path):
    """bench_quant.py end to end on a tiny stand-in for a demo run (a model.onnx and the SynthDrive cache layout)."""
    import numpy as np
    import torch
    from PIL import Image

    from sdca.data.synthdrive import GENERATOR_VERSION, generate_frame
    from sdca.deploy.onnx_export import export_onnx
    from sdca.models import build_model, save_checkpoint

    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "m.pt"), build_model("deeplabv2_small", 19, width=8, train_size=(64, 32)).eval())
    export_onnx(str(tmp_path / "m.pt"), str(run_dir / "model.onnx"))
    for split, n in (("train", 90), ("test", 4)):
        folder = tmp_path / "runs" / "synthdrive-cache" / GENERATOR_VERSION / "real_64x32" / split
        for sub in ("images", "labels"):
            (folder / sub).mkdir(parents=True)
        for i in range(n):
            image, label = generate_frame("real", split, i, 32, 64)
            Image.fromarray(image).save(folder / "images" / f"{i:04d}.png")
            Image.fromarray(label.astype(np.uint8)).save(folder / "labels" / f"{i:04d}.png")
    out = tmp_path / "q.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_quant.py"), "--run", str(run_dir),
                          "--repeat", "2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["demo"]["rows"]) == {"float32", "int8", "int8+Resize"}
    assert "target >= 1.5x" in run.stdout and "QDQ debugging" in run.stdout


def test_loader_benchmark_measures_every_stream_side_by_side():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_loader.py"), "--frames", "1", "--repeats",
                          "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines() if line.split()[:1] in (["source"], ["adapt"],
                                                                                      ["self_train"])]
    assert [r[:2] for r in rows] == [["source", "source"], ["adapt", "source"], ["adapt", "target"],
                                     ["self_train", "target"]]
    for r in rows:  # float ms, uint8 ms, and the speed-up their ratio
        assert float(r[4].rstrip("x")) == pytest.approx(float(r[2]) / float(r[3]), rel=0.02)
