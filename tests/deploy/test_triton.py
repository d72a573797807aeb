"""`sdca export --triton`: the config is valid under Triton's own schema and matches the ONNX graph."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from sdca.cli import main
from sdca.deploy.metadata import read_onnx_metadata
from sdca.deploy.onnx_export import export_onnx
from sdca.deploy.triton import write_triton_repository
from sdca.models import build_model, save_checkpoint

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton")
    torch.manual_seed(0)
    path = tmp / "m.pt"
    save_checkpoint(str(path), build_model("deeplabv2_small", 19, width=8).eval())
    return path


def parse(path):
    # Strict: an unknown field, a wrong enum name or a type error raises ParseError.
    return text_format.Parse(open(path).read(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("output", ["logits", "labels"])
def test_repository_config_is_valid_and_matches_the_graph(checkpoint, tmp_path, output):
    repo = tmp_path / "repo"
    result = CliRunner().invoke(main, ["export", "--onnx", str(checkpoint), "--output", output, "--triton", str(repo),
                                       "--triton-name", "seg", "--max-batch", "4", "--no-check"])
    assert result.exit_code == 0, result.output
    config = parse(repo / "seg" / "config.pbtxt")
    onnx_file = repo / "seg" / "1" / "model.onnx"
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert config.name == "seg" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 4
    assert config.HasField("dynamic_batching")
    types = {"tensor(float)": model_config_pb2.TYPE_FP32, "tensor(uint8)": model_config_pb2.TYPE_UINT8}
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [t.name for t in declared] == [t.name for t in actual]
        for d, a in zip(declared, actual):
            assert d.data_type == types[a.type]
            # Triton's dims leave out the batch dimension; symbolic ONNX dims are -1.
            assert list(d.dims) == [s if isinstance(s, int) else -1 for s in a.shape[1:]]
    info = read_onnx_metadata(str(onnx_file))
    assert json.loads(config.parameters["mean"].string_value) == list(info.mean)
    assert json.loads(config.parameters["class_names"].string_value) == info.class_names
    # The model Triton would load runs a batch of 2.
    out = session.run(None, {"image": np.zeros((2, 3, 32, 48), np.float32)})[0]
    assert out.shape[0] == 2


def test_static_size_and_existing_folders_are_refused(checkpoint, tmp_path):
    static = tmp_path / "static.onnx"
    export_onnx(str(checkpoint), str(static), static_size=(64, 32))
    with pytest.raises(ValueError, match="dynamic-batch"):
        write_triton_repository(str(static), str(tmp_path / "repo"))
    dynamic = tmp_path / "dynamic.onnx"
    export_onnx(str(checkpoint), str(dynamic), check=False)
    write_triton_repository(str(dynamic), str(tmp_path / "repo"), "m")
    with pytest.raises(FileExistsError, match="exists"):
        write_triton_repository(str(dynamic), str(tmp_path / "repo"), "m")
    with pytest.raises(ValueError, match="name"):
        write_triton_repository(str(dynamic), str(tmp_path / "repo"), "bad name/..")
    result = CliRunner().invoke(main, ["export", "--onnx", str(checkpoint), "--static-size", "64x32",
                                       "--triton", str(tmp_path / "r2")])
    assert result.exit_code != 0 and "--static-size" in result.output
