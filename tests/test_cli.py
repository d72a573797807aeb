"""The installed `sdca` entry point, run as a user would, in a subprocess."""
import json
import subprocess
import sys

import sdca
from tests.common_utils import run_sdca


def run(*args):
    return run_sdca(*args, timeout=120)


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
    out = run_sdca("--version", module=True, timeout=120)
    assert out.returncode == 0 and sdca.__version__ in out.stdout


# ------------------------------------------------------------------ parsing, with click's CliRunner (no subprocess)
def test_size_reads_w_x_h_and_the_older_w_h_form_alike(tmp_path):
    from sdca.cli import main

    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"not parsed here")
    command = main.commands["evaluate"]
    base = [str(ckpt), "--data", "images", "--root", str(tmp_path)]
    new = command.make_context("evaluate", base + ["--size", "64x32"])
    old = command.make_context("evaluate", base + ["--size", "64", "32"])
    assert new.params["size"] == old.params["size"] == (64, 32)
    infer = main.commands["infer"].make_context("infer", ["--size", "96", "48", "frames/"])
    assert infer.params["size"] == (96, 48) and infer.params["inputs"] == ("frames/",)


def test_a_library_error_is_one_line_naming_the_file(tmp_path):
    from click.testing import CliRunner

    from sdca.cli import main

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    result = CliRunner().invoke(main, ["export", str(junk), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and str(junk) in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_sweep_mean_teacher_needs_mean_teacher_only(tmp_path):
    from click.testing import CliRunner

    from sdca.cli import main

    result = CliRunner().invoke(main, ["experiment", "--sweep-mean-teacher", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "--sweep-mean-teacher goes with --mean-teacher-only" in result.output
    assert not (tmp_path / "e").exists()  # refused before anything is written


def test_the_command_line_loads_without_torch():
    """The CLI imports the library inside commands only: `sdca --help` needs click and the torch-free records."""
    out = subprocess.run([sys.executable, "-c", "import sys; import sdca.cli; print('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
