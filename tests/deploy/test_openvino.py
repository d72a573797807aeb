"""OpenVINO as a second CPU runtime: the same labels as ONNX Runtime for a trained model on SynthDrive frames
(f32 to 99.9% of pixels, bf16 to the gate's 98%, INT8 as close to float as ONNX Runtime's INT8), through `sdca infer --runtime openvino` too, and
a clear error for a file OpenVINO cannot read."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("openvino")

from sdca.data.synthdrive import generate_frame
from sdca.deploy.onnx_export import export_onnx
from sdca.deploy.quantize import quantize_int8
from sdca.models import build_model, save_checkpoint
from sdca_serve.runtime import OnnxSegmenter, OpenVinoSegmenter

H, W = 64, 128


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained for a few dozen steps on SynthDrive's 'real' frames, so that its labels are those of
    a model that learned something (a random one's argmax sits on near-ties), exported to ONNX; frames saved."""
    tmp = tmp_path_factory.mktemp("openvino")
    frames = [generate_frame("real", "train", i, H, W) for i in range(24)]
    torch.manual_seed(0)
    model = build_model("deeplabv2_small", 19, width=8, bn="train", train_size=(W, H))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    norm = model.info.normalization
    x = torch.stack([torch.from_numpy(f[0]).permute(2, 0, 1).float() / 255 for f in frames[:16]])
    y = torch.stack([torch.from_numpy(f[1].astype(np.int64)) for f in frames[:16]])
    for _ in range(40):
        logits = model(norm(x)).logits
        loss = F.cross_entropy(F.interpolate(logits, (H, W), mode="bilinear", align_corners=True), y,
                               ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    save_checkpoint(str(tmp / "m.pt"), model)
    export_onnx(str(tmp / "m.pt"), str(tmp / "m.onnx"), check=False)
    folder = tmp / "frames"
    folder.mkdir()
    for i, (image, _) in enumerate(frames):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return tmp, np.stack([f[0] for f in frames])


def agreement(a, b):
    return float((a == b).mean())


def test_openvino_labels_match_onnx_runtime(trained):
    tmp, frames = trained
    ort = OnnxSegmenter(str(tmp / "m.onnx"), ["CPUExecutionProvider"])
    reference = ort.predict(frames)[0]
    f32 = OpenVinoSegmenter(str(tmp / "m.onnx"), "f32").predict(frames)[0]
    assert agreement(f32, reference) >= 0.999
    assert len(np.unique(reference)) >= 3  # the model predicts several classes: agreement means something
    import openvino as ov

    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        bf16 = OpenVinoSegmenter(str(tmp / "m.onnx"), "bf16").predict(frames)[0]
        assert agreement(bf16, reference) >= 0.98  # the INT8 gate's default agreement
    labels, conf = OpenVinoSegmenter(str(tmp / "m.onnx"), "f32").predict(frames[:2], confidence=True)
    _, ref_conf = ort.predict(frames[:2], confidence=True)
    np.testing.assert_allclose(conf, ref_conf, rtol=1e-4, atol=1e-5)


def test_an_int8_export_runs_in_openvino_as_in_onnx_runtime(trained):
    tmp, frames = trained
    quantize_int8(str(tmp / "m.onnx"), str(tmp / "m.int8.onnx"), str(tmp / "frames"), calib_frames=16,
                  held_out_frames=4, min_agreement=0.0, progress=False)
    reference = OnnxSegmenter(str(tmp / "m.onnx"), ["CPUExecutionProvider"]).predict(frames)[0]
    ort_int8 = OnnxSegmenter(str(tmp / "m.int8.onnx"), ["CPUExecutionProvider"]).predict(frames)[0]
    ov_int8 = OpenVinoSegmenter(str(tmp / "m.int8.onnx"), "f32").predict(frames)[0]
    # The gate's measure (INT8 labels against float labels): OpenVINO's integer kernels round differently from
    # ONNX Runtime's (they agree with each other on about 97% of pixels here), so each is held to float, OpenVINO's
    # to within a point of ONNX Runtime's own agreement.
    ort_agreement, ov_agreement = agreement(ort_int8, reference), agreement(ov_int8, reference)
    assert ov_agreement >= ort_agreement - 0.01 and ov_agreement >= 0.95, (ov_agreement, ort_agreement)


def test_sdca_infer_runs_on_openvino_and_bad_files_are_named(trained, tmp_path):
    from sdca.cli import main as cli

    tmp, frames = trained
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["infer", str(tmp / "frames"), "--model", str(tmp / "m.onnx"), "--runtime",
                                      "openvino", "--trainid", "--out", str(out), "--quiet", "--batch", "1"])
    assert result.exit_code == 0, result.output
    ref = OnnxSegmenter(str(tmp / "m.onnx"), ["CPUExecutionProvider"]).predict(frames[:1])[0][0]
    assert agreement(np.asarray(Image.open(out / "trainid" / "000.png")), ref) >= 0.999
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model" * 10)
    with pytest.raises(ValueError, match="broken.onnx: OpenVINO cannot read this model"):
        OpenVinoSegmenter(str(bad))
    result = CliRunner().invoke(cli, ["infer", str(tmp / "frames"), "--model", str(tmp / "m.pt"), "--runtime",
                                      "openvino", "--out", str(tmp_path / "o2")])
    assert result.exit_code != 0 and "export the checkpoint first" in result.output
