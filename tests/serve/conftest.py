"""A real service process on loopback, started the way a deployment starts it, with torch and sdca unimportable."""

import pytest
import torch

from sdca.deploy.onnx_export import export_onnx
from sdca.models import build_model, save_checkpoint
from tests.common_utils import SIZE, Service


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
