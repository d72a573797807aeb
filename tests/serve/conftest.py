"""A real service process on loopback, started the way a deployment starts it, with torch and sdca unimportable."""
import http.client
import io
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from sdca.deploy.onnx_export import export_onnx
from sdca.models import build_model, save_checkpoint
from sdca_serve.loadtest import launch

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


@pytest.fixture(scope="session")
def served_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    model = build_model("deeplabv2_small", 19, width=8, bn="train").eval()
    with torch.no_grad():
        model.classifier.conv2d_list[0].bias.copy_(torch.randn(19) * 0.5)
    ckpt = tmp / "m.pt"
    save_checkpoint(str(ckpt), model)
    path = tmp / "m.onnx"
    export_onnx(str(ckpt), str(path), parity_shapes=((1, SIZE[1], SIZE[0]),))
    return str(path)


@pytest.fixture(scope="module")
def service(served_model):
    svc = Service(served_model, "--size", f"{SIZE[0]}x{SIZE[1]}", "--max-upload-mb", "1", "--max-side", "4096")
    yield svc
    svc.stop()
