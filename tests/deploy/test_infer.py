"""`sdca infer` on a fabricated tree with a corrupt file and a video: outputs, failures, resume, labelIds."""
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from sdca.deploy.infer import run_inference
from sdca.deploy.onnx_export import export_onnx
from sdca.deploy.runtime import open_segmenter
from sdca.models import build_model, save_checkpoint

LABELID_TO_19 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
                 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = build_model("deeplabv2_small", 19, width=8).eval()
    with torch.no_grad():  # spread predictions over several classes
        model.classifier.conv2d_list[0].bias.copy_(torch.randn(19) * 0.5)
    ckpt = tmp / "m.pt"
    save_checkpoint(str(ckpt), model)
    onnx_path = tmp / "m.onnx"
    export_onnx(str(ckpt), str(onnx_path), parity_shapes=((1, 33, 47),))
    return str(ckpt), str(onnx_path)


def make_inputs(root):
    rng = np.random.default_rng(1)
    (root / "cam0" / "day").mkdir(parents=True)
    (root / "cam1").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (36, 52, 3), dtype=np.uint8)).save(root / "cam0" / "day" / f"{i:03d}.png")
    Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)).save(root / "cam1" / "odd.jpg")
    (root / "cam1" / "broken.png").write_bytes((root / "cam0" / "day" / "000.png").read_bytes()[:90])
    writer = cv2.VideoWriter(str(root / "drive.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 32))
    for _ in range(5):
        writer.write(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    writer.release()


ALL = ("color", "overlay", "trainid", "labelid", "confidence")


def read(path):
    return np.array(Image.open(path))


def test_outputs_failures_and_label_encodings(tmp_path, exported):
    _, onnx_path = exported
    make_inputs(tmp_path / "in")
    segmenter = open_segmenter(onnx_path)
    summary = run_inference(segmenter, [str(tmp_path / "in")], str(tmp_path / "out"), outputs=ALL, batch=3,
                            progress=False)
    assert summary["frames"] == 4 + 1 + 5 and summary["backend"] == "onnxruntime"
    assert [f["file"].endswith("broken.png") for f in summary["failures"]] == [True]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["frames"] == 10
    out = tmp_path / "out"
    names = ["cam0/day/000", "cam1/odd", "drive/000004"]
    for name in names:
        trainid = read(out / "trainid" / f"{name}.png")
        labelid = read(out / "labelid" / f"{name}.png")
        back = np.vectorize(lambda v: LABELID_TO_19.get(int(v), 255))(labelid)
        assert np.array_equal(back, trainid)  # labelIds map back to trainIds exactly
        colour = read(out / "color" / f"{name}.png")
        palette = np.asarray(segmenter.info.palette, dtype=np.uint8)
        assert np.array_equal(colour, palette[trainid])
        conf = read(out / "confidence" / f"{name}.png")
        assert conf.shape == trainid.shape and conf.min() >= 255 // 19 - 1
        assert read(out / "overlay" / f"{name}.jpg").shape == trainid.shape + (3,)
    assert read(out / "trainid" / "cam1" / "odd.png").shape == (30, 44)  # native frame size kept
    assert len(np.unique(read(out / "trainid" / "cam0" / "day" / "000.png"))) > 1
    # The frames' own predictions, made directly, agree with what was written.
    frame = np.array(Image.open(tmp_path / "in" / "cam0" / "day" / "001.png").convert("RGB"))
    labels, _ = segmenter.predict(frame[None])
    assert np.array_equal(labels[0], read(out / "trainid" / "cam0" / "day" / "001.png"))


def test_skip_existing_resume_gives_the_clean_run(tmp_path, exported):
    _, onnx_path = exported
    make_inputs(tmp_path / "in")
    segmenter = open_segmenter(onnx_path)
    kw = dict(outputs=("trainid", "color"), batch=2, progress=False)
    run_inference(segmenter, [str(tmp_path / "in")], str(tmp_path / "clean"), **kw)
    # An interrupted run: some outputs missing, one only half there (color written, trainid not).
    shutil.copytree(tmp_path / "clean", tmp_path / "resumed")
    for rel in ("trainid/cam0/day/002.png", "color/cam0/day/002.png", "trainid/drive/000003.png",
                "trainid/cam1/odd.png"):
        os.remove(tmp_path / "resumed" / rel)
    summary = run_inference(segmenter, [str(tmp_path / "in")], str(tmp_path / "resumed"), skip_existing=True, **kw)
    assert summary["frames"] == 3 and summary["skipped_existing"] == 7
    for kind in ("trainid", "color"):
        for root, _, files in os.walk(tmp_path / "clean" / kind):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), tmp_path / "clean")
                assert (tmp_path / "resumed" / rel).read_bytes() == (tmp_path / "clean" / rel).read_bytes(), rel


def test_pytorch_backend_agrees_and_resizing(tmp_path, exported):
    ckpt, onnx_path = exported
    make_inputs(tmp_path / "in")
    frames = str(tmp_path / "in" / "cam0")
    a = run_inference(open_segmenter(onnx_path), [frames], str(tmp_path / "a"), outputs=("trainid",), progress=False)
    b = run_inference(open_segmenter(ckpt), [frames], str(tmp_path / "b"), outputs=("trainid",), progress=False)
    assert a["backend"] == "onnxruntime" and b["backend"] == "pytorch"
    for i in range(4):
        la, lb = read(tmp_path / "a" / "trainid" / "day" / f"{i:03d}.png"), read(tmp_path / "b" / "trainid" / "day" / f"{i:03d}.png")
        assert (la == lb).mean() >= 0.999
    c = run_inference(open_segmenter(onnx_path), [str(tmp_path / "in" / "cam0" / "day" / "*.png")], str(tmp_path / "c"),
                      outputs=("trainid",), size=(64, 48), progress=False)
    assert c["frames"] == 4 and read(tmp_path / "c" / "trainid" / "000.png").shape == (36, 52)


def test_bad_input_and_providers(tmp_path, exported):
    _, onnx_path = exported
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images or videos"):
        run_inference(open_segmenter(onnx_path), [str(tmp_path / "empty")], str(tmp_path / "o"), progress=False)
    with pytest.raises(FileNotFoundError, match="input not found"):
        run_inference(open_segmenter(onnx_path), [str(tmp_path / "nope")], str(tmp_path / "o"), progress=False)
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="CUDAExecutionProvider not available"):
            open_segmenter(onnx_path, providers=["cuda"])
    # A model whose input is not 3-channel: a clear error.
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 1, "h", "w"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 1, "h", "w"])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    from sdca.deploy.metadata import read_onnx_metadata
    for k, v in read_onnx_metadata(onnx_path).to_props().items():
        proto.metadata_props.add(key=k, value=v)
    gray = tmp_path / "gray.onnx"
    onnx.save(proto, str(gray))
    with pytest.raises(ValueError, match=r"input of shape \['b', 1, 'h', 'w'\]"):
        open_segmenter(str(gray))


def test_cli_export_and_infer_exit_status_and_no_torch(tmp_path, exported):
    ckpt, _ = exported
    make_inputs(tmp_path / "in")
    exe = shutil.which("sdca", path=os.path.dirname(sys.executable))
    out = subprocess.run([exe, "export", "--onnx", ckpt, "-o", str(tmp_path / "m.onnx"), "--output", "labels"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "label agreement 100.000%" in out.stdout
    run = subprocess.run([exe, "infer", str(tmp_path / "in"), "--model", str(tmp_path / "m.onnx"), "--out",
                          str(tmp_path / "out"), "--trainid", "--quiet"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "broken.png" in run.stderr  # some input failed: exit status says so
    assert "10 frames" in run.stdout
    # The ONNX Runtime path never imports torch.
    probe = ("import sys; from sdca.deploy.runtime import open_segmenter; from sdca.deploy.infer import run_inference;"
             f"s = open_segmenter({str(tmp_path / 'm.onnx')!r}); "
             f"run_inference(s, [{str(tmp_path / 'in' / 'cam1')!r}], {str(tmp_path / 'o2')!r}, progress=False); "
             "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "False", res.stderr
