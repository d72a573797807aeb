"""Helpers shared by the test modules (as torchvision's common_utils.py): the `sdca` command as a user runs it,
the device list of the kernel tests, fabricated scenes and frames, the public checkpoint layout with random
tensors, and a service process on loopback. Fixtures stay in the conftest.py files; plain helpers live here."""
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


# ------------------------------------------------------------------------------------------- the CLI
def sdca_exe() -> str:
    """The installed `sdca` console script next to this Python (what `make setup` installs)."""
    exe = shutil.which("sdca", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.fail("the `sdca` console script is not installed next to this Python; run `make setup`")
    return exe


def run_sdca(*args, cwd=None, env=None, timeout=300, module=False) -> subprocess.CompletedProcess:
    """`sdca ARGS...` in a subprocess, as typed (``module``: `python -m sdca ARGS...`); output captured as text;
    ``env`` adds to the environment."""
    cmd = [sys.executable, "-m", "sdca"] if module else [sdca_exe()]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


# ------------------------------------------------------------------------------------------- kernels
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs a CUDA device"))]


# ---------------------------------------------------------------- fabricated scenes and frames
SKY, ROAD, CAR, BUILDING = 10, 0, 13, 2  # Cityscapes trainIds
RAW = {SKY: 23, ROAD: 7, CAR: 26, BUILDING: 11}  # their Cityscapes labelIds (the folder mapping maps them back)
COLOURS = {SKY: (70, 130, 180), ROAD: (128, 64, 128), CAR: (0, 0, 142), BUILDING: (70, 70, 70)}


def scene(rng, h, w, real: bool):
    label = np.full((h, w), SKY, dtype=np.uint8)
    horizon = int(h * rng.uniform(0.4, 0.6))
    label[horizon:] = ROAD
    bx = int(rng.integers(0, w // 2))
    label[h // 4:horizon, bx:bx + w // 4] = BUILDING
    cx, cy = int(rng.integers(0, w - w // 4)), int(rng.integers(horizon, h - h // 6))
    label[cy:cy + h // 6, cx:cx + w // 4] = CAR
    image = np.zeros((h, w, 3), dtype=np.float32)
    for cls, colour in COLOURS.items():
        image[label == cls] = colour
    if real:  # another look: darker, warmer, noisy
        image = image * 0.7 + np.array([30, 10, -10]) + rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_tree(root, n, h, w, real, seed, labels=True):
    rng = np.random.default_rng(seed)
    raw_table = np.zeros(256, dtype=np.uint8)
    for cls, raw in RAW.items():
        raw_table[cls] = raw
    for i in range(n):
        image, label = scene(rng, h, w, real)
        os.makedirs(os.path.join(root, "images", f"seq{i % 2}"), exist_ok=True)
        Image.fromarray(image).save(os.path.join(root, "images", f"seq{i % 2}", f"f{i:03d}.png"))
        if labels:
            os.makedirs(os.path.join(root, "labels", f"seq{i % 2}"), exist_ok=True)
            Image.fromarray(raw_table[label]).save(os.path.join(root, "labels", f"seq{i % 2}", f"f{i:03d}.png"))


def scene_frames(folder, n, seed, constant=False):
    """Frames with structure (a horizon, a box), so that a trained-looking model's labels vary over the image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        if constant:
            img = np.zeros((32, 64, 3), np.uint8)
        else:
            img = np.zeros((32, 64, 3), np.float32)
            h = int(rng.integers(10, 22))
            img[:h] = rng.uniform(120, 230, 3)
            img[h:] = rng.uniform(30, 120, 3)
            x = int(rng.integers(0, 40))
            img[h - 6:h + 4, x:x + 16] = rng.uniform(0, 255, 3)
            img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"f{i:03d}.png")
    return folder


# ---------------------------------------------------------------- the public checkpoint layout
LAYOUT = json.loads(Path(os.path.join(os.path.dirname(__file__), "fixtures", "official_state_dict_layout.json")).read_text())


def public_state(section, num_classes=19, prefix="", seed=0):
    """Random tensors in the public code's exact key layout (tests/fixtures/official_state_dict_layout.json)."""
    gen = torch.Generator().manual_seed(seed)
    fe = {}
    for key, shape, dtype in LAYOUT[section]["feature_extractor_state_dict"]:
        if dtype == "int64":
            fe[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            fe[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith("running_mean") or key.endswith(".bias"):
            fe[key] = torch.randn(shape, generator=gen) * 0.1
        elif len(shape) == 1:  # batch-norm weight
            fe[key] = torch.rand(shape, generator=gen) * 0.5 + 0.5
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            fe[key] = torch.randn(shape, generator=gen) / fan_in ** 0.5
    if num_classes == 19:
        cls_layout = LAYOUT[section]["classifier_state_dict"]
    else:
        cls_layout = LAYOUT["classifier_16_classes_" + ("vgg16" if section == "vgg16" else "resnet101")]
    cls = {k: torch.randn(s, generator=gen) * 0.01 for k, s, _ in cls_layout}
    return {"iteration": 1000, "feature_extractor": {prefix + k: v for k, v in fe.items()},
            "classifier": {prefix + k: v for k, v in cls.items()}}


# ---------------------------------------------------------------- a service on loopback
from sdca_serve.loadtest import launch  # noqa: E402

# sys.modules[name] = None makes `import name` fail: proof that serving needs neither torch nor the training code.
LAUNCH = ("import sys; sys.modules['torch'] = None; sys.modules['sdca'] = None; "
          "from sdca_serve.__main__ import main; sys.exit(main(sys.argv[1:]))")
SIZE = (128, 64)  # (width, height) the test model serves


class Service:
    def __init__(self, model: str, *args: str):
        self.process, self.port = launch(model, *args, python_args=("-c", LAUNCH), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)

    def request(self, method, path, body=None, headers=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.getheader("content-type"), response.read()
        finally:
            conn.close()

    def segment(self, body, output="labels", content_type="image/png"):
        return self.request("POST", f"/segment?output={output}", body, {"Content-Type": content_type})

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
