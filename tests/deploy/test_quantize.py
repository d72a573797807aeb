"""INT8 export: QDQ where expected and float where the policy keeps it, the accuracy gate (recomputed here, and
refusing a bad calibration), metadata and side files, and the INT8 model in sdca infer."""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from sdca.deploy.metadata import read_onnx_metadata
from sdca.deploy.onnx_export import export_onnx
from sdca.deploy.quantize import QuantizationRejected, find_frames, quantize_int8, split_frames
from sdca.models import build_model, save_checkpoint
from sdca_serve.runtime import preprocess
from tests.common_utils import scene_frames


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    model = build_model("deeplabv2_small", 19, width=8, train_size=(64, 32)).eval()
    save_checkpoint(str(tmp / "m.pt"), model)
    export_onnx(str(tmp / "m.pt"), str(tmp / "m.onnx"))
    return tmp


def test_qdq_where_expected_and_the_gate_recomputed(float_model):
    tmp = float_model
    frames = scene_frames(tmp / "frames", 40, seed=0)
    out = tmp / "m.int8.onnx"
    report = quantize_int8(str(tmp / "m.onnx"), str(out), str(frames), calib_frames=24, held_out_frames=16,
                           min_agreement=0.0, progress=False)
    graph = onnx.load(str(out)).graph
    producer = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(producer[n.input[0]].op_type == "DequantizeLinear" for n in convs)  # int8 activations
    assert all(producer[n.input[1]].op_type == "DequantizeLinear" for n in convs)  # and weights
    kept = [n for n in graph.node if n.op_type in ("Resize", "Softmax", "ArgMax")]
    consumers = {i: n for n in graph.node for i in n.input}
    for node in kept:  # the output stage runs in float: nothing quantizes what it produces
        assert all(consumers.get(o) is None or consumers[o].op_type != "QuantizeLinear" for o in node.output)
    assert graph.output[0].name in [o for n in kept for o in n.output]

    # The agreement and mIoU recomputed here, on the held-out frames, with both models.
    split = split_frames(find_frames(str(frames)), 24, 16)
    assert not set(split.calibration) & set(split.held_out) and len(split.held_out) == 16
    info = read_onnx_metadata(str(tmp / "m.onnx"))
    f = ort.InferenceSession(str(tmp / "m.onnx"), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    same, total, inter, union = 0, 0, np.zeros(19), np.zeros(19)
    for path in split.held_out:
        x = preprocess(np.asarray(Image.open(path).convert("RGB"))[None], info)
        a = f.run(None, {"image": x})[0].argmax(1)
        b = q.run(None, {"image": x})[0].argmax(1)
        same, total = same + int((a == b).sum()), total + a.size
        for k in range(19):
            inter[k] += np.logical_and(a == k, b == k).sum()
            union[k] += np.logical_or(a == k, b == k).sum()
    assert report["label_agreement"] == pytest.approx(same / total, abs=1e-12)
    assert report["miou_vs_float"] == pytest.approx(float(np.mean(inter[union > 0] / union[union > 0])), abs=1e-12)

    meta = read_onnx_metadata(str(out))  # the float model's metadata, kept
    assert meta.class_names == info.class_names and meta.train_size == (64, 32)
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert props["precision"] == "int8" and json.loads(props["quantization"]) == report
    with pytest.raises(ValueError, match="quantized already"):
        quantize_int8(str(out), str(tmp / "again.onnx"), str(frames), progress=False)


def test_gate_refuses_a_bad_calibration_and_force_overrides(float_model):
    tmp = float_model
    black = scene_frames(tmp / "black", 12, seed=1, constant=True)
    real = scene_frames(tmp / "real", 12, seed=2)
    out = tmp / "bad.int8.onnx"
    with pytest.raises(QuantizationRejected, match="below --min-agreement"):
        quantize_int8(str(tmp / "m.onnx"), str(out), str(black), held_out=str(real), calib_frames=12,
                      held_out_frames=12, min_agreement=0.98, progress=False)
    assert not out.exists()
    report = quantize_int8(str(tmp / "m.onnx"), str(out), str(black), held_out=str(real), calib_frames=12,
                           held_out_frames=12, min_agreement=0.98, force=True, progress=False)
    assert out.exists() and report["forced"] and report["label_agreement"] < 0.98


def test_too_few_or_unreadable_frames_are_errors_naming_the_count(float_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no calibration frames"):
        quantize_int8(str(float_model / "m.onnx"), str(tmp_path / "x.onnx"), str(tmp_path), progress=False)
    few = scene_frames(tmp_path / "few", 6, seed=3)
    (few / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"7 frames found, .* \(1 unreadable\)"):
        quantize_int8(str(float_model / "m.onnx"), str(tmp_path / "x.onnx"), str(few), progress=False)


def test_int8_export_through_the_cli_side_files_and_infer(float_model, tmp_path):
    import shutil
    import subprocess
    import sys

    exe = shutil.which("sdca", path=os.path.dirname(sys.executable))
    frames = scene_frames(tmp_path / "frames", 30, seed=4)
    bad = subprocess.run([exe, "export", str(float_model / "m.pt"), "-o", str(tmp_path / "q.onnx"), "--int8",
                          "--fp16", "--calibrate", str(frames)], capture_output=True, text=True)
    assert bad.returncode == 2 and "exclude each other" in bad.stderr
    run = subprocess.run([exe, "export", "--onnx", str(float_model / "m.pt"), "-o", str(tmp_path / "q.onnx"),
                          "--int8", "--calibrate", str(frames), "--calib-frames", "20", "--holdout-frames", "10",
                          "--min-agreement", "0", "--triton", str(tmp_path / "repo")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    triton_model = tmp_path / "repo" / "sdca" / "1" / "model.onnx"  # the Triton repository holds the INT8 model
    assert triton_model.read_bytes() == (tmp_path / "q.onnx").read_bytes()
    assert "precision" in {p.key for p in onnx.load(str(triton_model), load_external_data=False).metadata_props}
    assert "label agreement" in run.stdout
    from sdca.deploy.sidecar import describe
    assert describe(str(tmp_path / "q.onnx"))["precision"] == "int8"
    assert (tmp_path / "q.labels.txt").read_text().splitlines()[0] == "road"
    seg = subprocess.run([exe, "infer", str(frames), "--model", str(tmp_path / "q.onnx"), "--out",
                          str(tmp_path / "seg"), "--quiet", "--trainid"], capture_output=True, text=True)
    assert seg.returncode == 0, seg.stderr
    assert len(list((tmp_path / "seg" / "trainid").glob("*.png"))) == 30


def test_calibration_frames_from_a_config_data_entry(float_model, tmp_path):
    """--calibrate CONFIG:ENTRY takes a data set's images, as a training config names them."""
    from sdca.cli import _frames_of

    frames = scene_frames(tmp_path / "real", 14, seed=5)
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{target: {{kind: images, root: {frames}}}}}\n")
    paths = _frames_of(f"{config}:target")
    assert sorted(paths) == sorted(str(p) for p in frames.glob("*.png"))
    report = quantize_int8(str(float_model / "m.onnx"), str(tmp_path / "q.onnx"), paths, calib_frames=10,
                           held_out_frames=4, min_agreement=0.0, progress=False)
    assert report["calibration_frames"] == 10 and report["held_out_frames"] == 4
    assert _frames_of(str(frames)) == str(frames)  # a folder stays a folder
