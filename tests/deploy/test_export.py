"""ONNX export: parity with PyTorch per backbone on odd sizes and batch > 1, metadata, in-graph argmax."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from sdca.deploy.metadata import read_onnx_metadata
from sdca.deploy.onnx_export import export_onnx
from sdca.models import build_model, save_checkpoint, upsample_logits


@pytest.mark.parametrize("arch", ["deeplabv2_small", "deeplabv2_resnet50", "deeplabv2_resnet101", "deeplabv2_vgg16",
                                  "deeplabv2_lite0"])
def test_export_parity_per_backbone(tmp_path, arch):
    torch.manual_seed(0)
    model = build_model(arch, 19, width=8).eval()
    path = tmp_path / f"{arch}.onnx"
    report = export_onnx(model, str(path), parity_shapes=((1, 97, 131), (2, 65, 83)))
    assert all(p["label_agreement"] >= 0.999 for p in report["parity"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    assert inp.shape == ["batch", 3, "height", "width"] and out.shape == ["batch", 19, "height", "width"]
    x = torch.randn(3, 3, 71, 103)  # a size and batch the export never saw
    with torch.no_grad():
        ref = upsample_logits(model(x).logits, (71, 103)).numpy()
    got = session.run(None, {"image": x.numpy()})[0]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-5
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.999


def test_metadata_round_trip_and_argmax_output(tmp_path):
    model = build_model("deeplabv2_small", 16, width=8, train_size=(512, 256)).eval()  # SYNTHIA's 16 classes
    ckpt = tmp_path / "m.pt"
    save_checkpoint(str(ckpt), model)
    logits_path, labels_path = tmp_path / "logits.onnx", tmp_path / "labels.onnx"
    export_onnx(str(ckpt), str(logits_path), output="logits")
    export_onnx(str(ckpt), str(labels_path), output="labels")
    meta = read_onnx_metadata(str(labels_path))
    info = model.info
    assert meta.class_names == info.class_names and meta.num_classes == 16
    assert meta.palette == [tuple(c) for c in info.palette]
    assert meta.mean == info.normalization.mean and meta.std == info.normalization.std
    assert meta.channel_order == "RGB" and meta.scale == 1.0 and meta.train_size == (512, 256)
    assert meta.output == "labels" and meta.source_checkpoint == "m.pt" and len(meta.source_checkpoint_sha256) == 64
    import hashlib
    assert meta.source_checkpoint_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    x = np.random.default_rng(0).standard_normal((2, 3, 59, 77)).astype(np.float32)
    logits = ort.InferenceSession(str(logits_path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    labels = ort.InferenceSession(str(labels_path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert labels.dtype == np.uint8 and labels.shape == (2, 59, 77)
    assert np.array_equal(labels, logits.argmax(1))
    assert labels.nbytes * 16 * 4 == logits.nbytes  # K float32 per pixel vs one byte


def test_fp16_weights_and_public_checkpoint_export(tmp_path):
    from tests.common_utils import public_state  # the public key layout with random tensors

    ckpt = tmp_path / "model_best.pth"
    torch.save(public_state("vgg16", 19, "module."), ckpt)
    path = tmp_path / "vgg.onnx"
    report = export_onnx(str(ckpt), str(path), fp16=True, parity_shapes=((1, 65, 97),))
    meta = read_onnx_metadata(str(path))
    assert meta.channel_order == "BGR" and meta.scale == 255.0 and meta.arch == "deeplabv2_vgg16"
    assert report["parity"][0]["label_agreement"] >= 0.99
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)" and session.get_outputs()[0].type == "tensor(float)"
