"""The installed `sdca` entry point, run as a user would, in a subprocess."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import sdca


def sdca_cmd():
    exe = shutil.which("sdca", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.fail("the `sdca` console script is not installed next to this Python; run `make setup`")
    return [exe]


def run(*args):
    return subprocess.run(sdca_cmd() + list(args), capture_output=True, text=True, timeout=120)


def test_version():
    out = run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"sdca, version {sdca.__version__}"


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0 and "doctor" in out.stdout


def test_doctor_json_reports_backends():
    out = run("doctor", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    import torch

    assert info["torch"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    assert isinstance(info["extension"], bool)
    assert "CPUExecutionProvider" in info["onnxruntime_providers"]
    text = run("doctor")
    assert text.returncode == 0 and "SDCA kernels" in text.stdout


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "sdca", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and sdca.__version__ in out.stdout
