"""EfficientNet-Lite0 through every deployment path: sdca infer, the Triton writer, sdca serve, the C++ consumer.

Each path is checked against ONNX Runtime's labels for the same export (the export itself against PyTorch is
in test_export.py's per-backbone parity test)."""
import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdca.data.synthdrive import generate_frame
from sdca.deploy.infer import run_inference
from sdca.deploy.onnx_export import export_onnx
from sdca.models import build_model, save_checkpoint
from sdca_serve.runtime import OnnxSegmenter

WIDTH, HEIGHT = 128, 64


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lite0")
    torch.manual_seed(0)
    model = build_model("deeplabv2_lite0", 19, bn="train", train_size=(WIDTH, HEIGHT)).eval()
    with torch.no_grad():  # spread the predictions over several classes
        model.classifier.conv2d_list[0].bias.copy_(torch.randn(19) * 0.5)
    ckpt = tmp / "lite0.pt"
    save_checkpoint(str(ckpt), model)
    dynamic, static = tmp / "lite0.onnx", tmp / "lite0.static.onnx"
    export_onnx(str(ckpt), str(dynamic), parity_shapes=((1, HEIGHT, WIDTH),))
    export_onnx(str(ckpt), str(static), static_size=(WIDTH, HEIGHT))
    frames = tmp / "frames"
    frames.mkdir()
    for i in range(3):
        Image.fromarray(generate_frame("real", "test", i, HEIGHT, WIDTH)[0]).save(frames / f"{i}.png")
    return dynamic, static, frames


def _expected(model_path, frame_path):
    return OnnxSegmenter(str(model_path)).predict(np.asarray(Image.open(frame_path).convert("RGB"))[None])[0][0]


def test_infer(lite0, tmp_path):
    dynamic, _, frames = lite0
    summary = run_inference(OnnxSegmenter(str(dynamic)), [str(frames)], str(tmp_path / "out"), outputs=("trainid",),
                            progress=False)
    assert summary["frames"] == 3 and not summary["failures"]
    for i in range(3):
        got = np.asarray(Image.open(tmp_path / "out" / "trainid" / f"{i}.png"))
        assert (got == _expected(dynamic, frames / f"{i}.png")).mean() >= 0.999


def test_triton_repository(lite0, tmp_path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    text_format = pytest.importorskip("google.protobuf.text_format")
    from sdca.deploy.triton import write_triton_repository

    dynamic, _, _ = lite0
    folder = write_triton_repository(str(dynamic), str(tmp_path / "repo"), "lite0")
    config = text_format.Parse(Path(f"{folder}/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "lite0" and config.output[0].dims[0] == 19


def test_serve(lite0):
    pytest.importorskip("fastapi")
    from tests.common_utils import Service, png

    dynamic, _, frames = lite0
    svc = Service(str(dynamic))
    try:
        frame = np.asarray(Image.open(frames / "0.png").convert("RGB"))
        status, _, body = svc.segment(png(frame))
        assert status == 200
        assert (np.asarray(Image.open(io.BytesIO(body))) == _expected(dynamic, frames / "0.png")).mean() >= 0.999
    finally:
        svc.stop()


def test_cpp_consumer(lite0, consumer, tmp_path):
    _, static, frames = lite0
    run = subprocess.run([consumer, str(static), str(frames / "1.png"), str(tmp_path / "l.png")], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    got = np.asarray(Image.open(tmp_path / "l.png"))
    assert (got == _expected(static, frames / "1.png")).mean() >= 0.999


def test_relu6_is_one_clip_node_except_for_opencv(tmp_path):
    """The dynamic export (ONNX Runtime, OpenVINO, TensorRT, Triton) writes ReLU6 as Clip(0, 6); the fixed-size
    export for OpenCV's importer as relu(x) - relu(x - 6); both match PyTorch (export's parity check), and
    --describe says which."""
    import onnx

    from sdca.deploy.sidecar import describe

    torch.manual_seed(0)
    model = build_model("deeplabv2_lite0", 19, bn="train", train_size=(64, 32)).eval()
    ckpt = tmp_path / "lite0.pt"
    save_checkpoint(str(ckpt), model)
    counts = {}
    for name, kwargs in (("dynamic", {}), ("static", {"static_size": (64, 32)}),
                         ("forced", {"relu6": "relu-difference"})):
        path = tmp_path / f"{name}.onnx"
        report = export_onnx(str(ckpt), str(path), parity_shapes=((1, 33, 65),), **kwargs)
        assert all(p["label_agreement"] >= 0.999 for p in report["parity"])
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        counts[name] = (ops.count("Clip"), ops.count("Sub"), report["relu6"], describe(str(path))["relu6"])
    relu6_layers = counts["dynamic"][0]
    assert relu6_layers >= 30  # stem + every block's expansion and depthwise activations
    assert counts["dynamic"][1:] == (0, "clip", "clip")
    assert counts["static"][0] == 0 and counts["static"][1] >= relu6_layers
    assert counts["static"][2:] == ("relu-difference", "relu-difference")
    assert counts["forced"][0] == 0 and counts["forced"][2] == "relu-difference"
