"""INT8 that can be fast: unsigned activations on x86 make ONNX Runtime run convolutions as integer kernels (counted
in its own optimised graph), the platform picks the default, and calibration holds a bounded number of frames'
activations whatever the frame count."""
import json
import os
import subprocess
import sys

import onnx
import pytest
import torch

from sdca.deploy.onnx_export import export_onnx
from sdca.deploy.quantize import default_activations, integer_kernels, quantize_int8
from sdca.models import build_model, save_checkpoint
from tests.common_utils import scene_frames


@pytest.mark.parametrize("machine,expected", [("x86_64", "uint8"), ("AMD64", "uint8"), ("aarch64", "int8"),
                                              ("arm64", "int8")])
def test_the_platform_picks_the_activation_type(machine, expected):
    assert default_activations(machine) == expected


def exported(tmp, arch, **kw):
    torch.manual_seed(0)
    model = build_model(arch, 19, train_size=(64, 32), **kw).eval()
    save_checkpoint(str(tmp / f"{arch}.pt"), model)
    export_onnx(str(tmp / f"{arch}.pt"), str(tmp / f"{arch}.onnx"), check=False)
    return str(tmp / f"{arch}.onnx")


@pytest.mark.skipif(default_activations() != "uint8", reason="the integer-kernel rule measured here is x86's")
@pytest.mark.parametrize("arch,kw", [("deeplabv2_small", {"width": 16}), ("deeplabv2_resnet101", {})])
def test_unsigned_activations_run_more_convolutions_as_integer_kernels(tmp_path, arch, kw):
    """On the demo's network and on ResNet-101: the optimised graph ONNX Runtime runs (not the QDQ file) has more
    integer convolutions with U8S8 than with S8S8, and with U8S8 every convolution is one."""
    model = exported(tmp_path, arch, **kw)
    frames = scene_frames(tmp_path / "frames", 12, seed=1)
    counts = {}
    for act in ("int8", "uint8"):
        out = tmp_path / f"{act}.onnx"
        report = quantize_int8(model, str(out), str(frames), calib_frames=8, held_out_frames=4, min_agreement=0.0,
                               method="minmax", activations=act, progress=False)
        counts[act] = integer_kernels(str(out))
        assert report["activations"] == act and report["integer_convs"] == counts[act]["integer_convs"]
        props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
        assert json.loads(props["quantization"])["integer_convs"] == counts[act]["integer_convs"]
    graph_convs = sum(n.op_type == "Conv" for n in onnx.load(model, load_external_data=False).graph.node)
    assert counts["uint8"]["integer_convs"] > counts["int8"]["integer_convs"]
    assert counts["uint8"]["integer_convs"] == counts["uint8"]["convs"] == graph_convs
    assert integer_kernels(model)["integer_convs"] == 0  # the float model: none, as a baseline for the count


PEAK = r'''
import resource, sys
from sdca.deploy.quantize import quantize_int8
quantize_int8(sys.argv[1], sys.argv[2], sys.argv[3], calib_frames=int(sys.argv[4]), held_out_frames=2,
              size=(512, 256), min_agreement=0.0, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
'''


def test_calibration_memory_does_not_grow_with_the_frame_count(tmp_path):
    """The case that ran out of memory: ONNX Runtime keeps every intermediate output of every calibration frame.
    At 512 x 256 one frame's activations of this network are about 45 MB, so 32 frames held at once would add
    over a gigabyte to the peak; calibrated in chunks, 32 frames peak where 8 do (within 150 MiB)."""
    model = exported(tmp_path, "deeplabv2_small", width=8)
    frames = scene_frames(tmp_path / "frames", 40, seed=2)
    script = tmp_path / "peak.py"
    script.write_text(PEAK)
    peaks = {}
    for n in (8, 32):
        run = subprocess.run([sys.executable, str(script), model, str(tmp_path / f"q{n}.onnx"), str(frames), str(n)],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        peaks[n] = int(run.stdout.split()[-1]) / 1024  # MiB
    assert peaks[32] - peaks[8] < 150, peaks
