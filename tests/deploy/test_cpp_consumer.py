"""The C++ consumer (export/): built with CMake, its label maps against onnxruntime's on SynthDrive frames."""
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from sdca.data.synthdrive import generate_frame
from sdca.deploy.onnx_export import export_onnx
from sdca.models import build_model, save_checkpoint
from sdca_serve.runtime import OnnxSegmenter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WIDTH, HEIGHT = 128, 64




@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpp-models")
    torch.manual_seed(0)
    model = build_model("deeplabv2_small", 19, width=8, bn="train").eval()
    with torch.no_grad():  # spread the predictions over several classes
        model.classifier.conv2d_list[0].bias.copy_(torch.randn(19) * 0.5)
    ckpt = tmp / "m.pt"
    save_checkpoint(str(ckpt), model)
    static, dynamic = tmp / "static.onnx", tmp / "dynamic.onnx"
    export_onnx(str(ckpt), str(static), static_size=(WIDTH, HEIGHT))
    export_onnx(str(ckpt), str(dynamic), parity_shapes=((1, 32, 48),))
    return str(static), str(dynamic)


def test_consumer_labels_agree_with_onnxruntime_on_synthdrive_frames(consumer, models, tmp_path):
    static, _ = models
    segmenter = OnnxSegmenter(static)
    # --static-size: every input dimension fixed (no shape arithmetic for OpenCV) and recorded in the metadata.
    assert segmenter.session.get_inputs()[0].shape == [1, 3, HEIGHT, WIDTH]
    assert segmenter.info.input_size == (WIDTH, HEIGHT)
    agree, total = 0, 0
    for i in range(4):
        image, _ = generate_frame("real", "test", i, HEIGHT, WIDTH)
        path = tmp_path / f"frame{i}.png"
        Image.fromarray(image).save(path)
        out, colour = tmp_path / f"labels{i}.png", tmp_path / f"colour{i}.png"
        run = subprocess.run([consumer, static, str(path), str(out), "--color", str(colour)], capture_output=True,
                             text=True)
        assert run.returncode == 0, run.stderr
        got = np.asarray(Image.open(out))
        expected = segmenter.predict(image[None])[0][0]
        assert got.shape == expected.shape == (HEIGHT, WIDTH)
        agree += int((got == expected).sum())
        total += got.size
        palette = np.asarray(segmenter.info.palette, dtype=np.uint8)
        np.testing.assert_array_equal(np.asarray(Image.open(colour).convert("RGB")), palette[got])
    assert agree / total >= 0.999, f"labels agree on {100 * agree / total:.3f}% of pixels"


def test_consumer_returns_labels_at_the_input_size(consumer, models, tmp_path):
    static, _ = models
    image, _ = generate_frame("real", "test", 7, 2 * HEIGHT + 3, 2 * WIDTH + 5)  # not the model's size
    Image.fromarray(image).save(tmp_path / "big.png")
    run = subprocess.run([consumer, static, str(tmp_path / "big.png"), str(tmp_path / "l.png")], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    labels = np.asarray(Image.open(tmp_path / "l.png"))
    assert labels.shape == image.shape[:2] and labels.max() < 19


def test_consumer_errors_name_the_problem(consumer, models, tmp_path):
    static, dynamic = models
    frame = tmp_path / "f.png"
    Image.fromarray(generate_frame("real", "test", 0, HEIGHT, WIDTH)[0]).save(frame)
    usage = subprocess.run([consumer], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
    dyn = subprocess.run([consumer, dynamic, str(frame), str(tmp_path / "o.png")], capture_output=True, text=True)
    assert dyn.returncode == 1 and "--static-size" in dyn.stderr
    missing = subprocess.run([consumer, static, str(tmp_path / "nope.png"), str(tmp_path / "o.png")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "nope.png" in missing.stderr
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    junk = subprocess.run([consumer, str(tmp_path / "junk.onnx"), str(frame), str(tmp_path / "o.png")],
                          capture_output=True, text=True)
    assert junk.returncode == 1 and "junk.onnx" in junk.stderr


def test_consumer_names_what_to_use_for_an_int8_model(consumer, models, tmp_path):
    """OpenCV's DNN module cannot import ONNX Runtime's QDQ models: the consumer says so and what runs them."""
    from sdca.deploy.quantize import quantize_int8

    static, _ = models
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(12):
        image, _ = generate_frame("real", "test", i, HEIGHT, WIDTH)
        Image.fromarray(image).save(frames / f"{i:02d}.png")
    int8 = tmp_path / "static.int8.onnx"
    quantize_int8(static, str(int8), str(frames), calib_frames=8, held_out_frames=4, min_agreement=0.0,
                  progress=False)
    run = subprocess.run([consumer, str(int8), str(frames / "00.png"), str(tmp_path / "l.png")], capture_output=True,
                         text=True)
    assert run.returncode != 0 and "INT8 (QDQ)" in run.stderr and "ONNX Runtime" in run.stderr
