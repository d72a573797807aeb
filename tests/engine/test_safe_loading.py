"""No file the toolkit reads may run code: booby-trapped checkpoints are refused by every command and API that
reads one, before anything from them runs; --trust-checkpoint / trusted=True lift the refusal; sdca's own
checkpoints of every stage, the public layouts and a checkpoint written by the previous format still load, and
the old one still resumes exactly."""
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

import sdca
from sdca.cli import main as cli
from sdca.models import (
    UntrustedFileError,
    build_model,
    import_public_checkpoint,
    load_model,
    load_torch_file,
    read_checkpoint,
    save_checkpoint,
)
from sdca.models.checkpoint import FORMAT

from .checks import assert_same_training_state

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "checkpoint_format1", "adapt-last-step2.pt")


class Trap:
    """Unpickling calls ``pathlib.Path.touch(marker)``: a file appears if the loader runs code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


class SystemTrap(Trap):
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Note:
    """A harmless custom class: a file holding it needs trust to load, and loads with it."""

    def __init__(self, text):
        self.text = text


def small_model():
    torch.manual_seed(0)
    return build_model("deeplabv2_small", 19, width=2, train_size=(64, 32)).eval()


def trapped(tmp_path, layout, trap_cls=Trap):
    """A booby-trapped checkpoint in the public or sdca layout, and the marker its payload would create."""
    marker = tmp_path / f"marker-{layout}-{trap_cls.__name__}"
    path = tmp_path / f"{layout}-{trap_cls.__name__}.pth"
    if layout == "public":
        torch.save({"feature_extractor": trap_cls(marker), "classifier": {}}, path)
    else:  # a genuine sdca checkpoint with the payload tucked into its extra entry
        model = small_model()
        torch.save({"format": FORMAT, "format_version": 2, "model": {"info": model.info.to_dict(),
                                                                     "state_dict": model.state_dict()},
                    "extra": {"payload": trap_cls(marker)}}, path)
    return path, marker


@pytest.mark.parametrize("layout", ["public", "sdca"])
@pytest.mark.parametrize("trap_cls", [Trap, SystemTrap])
def test_the_trap_is_real_and_every_api_refuses_it(tmp_path, layout, trap_cls):
    path, marker = trapped(tmp_path, layout, trap_cls)
    from sdca.deploy.onnx_export import export_onnx
    from sdca.deploy.runtime import open_segmenter
    from sdca.engine.adapt_bn import adapt_batchnorm
    from sdca.engine.inspect import inspect_checkpoint

    frame = tmp_path / "f.png"
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(frame)
    readers = {
        "read_checkpoint": lambda: read_checkpoint(str(path)),
        "sdca.load_model": lambda: sdca.load_model(str(path)),
        "import_public_checkpoint": lambda: import_public_checkpoint(str(path)),
        "export_onnx": lambda: export_onnx(str(path), str(tmp_path / "x.onnx")),
        "open_segmenter": lambda: open_segmenter(str(path), "pytorch", device="cpu"),
        "adapt_batchnorm": lambda: adapt_batchnorm(str(path), [str(frame)] * 2, str(tmp_path / "a.pt")),
        "inspect_checkpoint": lambda: inspect_checkpoint(str(path), [], [], str(tmp_path / "i")),
        "build_model(pretrained=...)": lambda: build_model("deeplabv2_resnet50", 19, pretrained=str(path)),
    }
    for name, read in readers.items():
        with pytest.raises(UntrustedFileError) as info:
            read()
        message = str(info.value)
        assert str(path) in message and "--trust-checkpoint" in message and "trusted=True" in message, name
        expected = "pathlib" if trap_cls is Trap else "system"
        assert expected in message, (name, message)  # names what the file asked for
        assert not marker.exists(), f"{name} ran the file's code"
    # The same file does run code under full unpickling: the refusal above is what kept the marker away.
    try:
        load_torch_file(str(path), trusted=True)
    except Exception:
        pass
    assert marker.exists()


def _frames(folder, n=2):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray((np.random.default_rng(i).random((32, 64, 3)) * 255).astype(np.uint8)).save(
            folder / f"f{i}.png")
    return folder


@pytest.mark.parametrize("layout", ["public", "sdca"])
def test_every_command_refuses_a_trapped_checkpoint(tmp_path, layout, tiny_data):
    path, marker = trapped(tmp_path, layout)
    frames = _frames(tmp_path / "frames")
    _, config = tiny_data
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({**config, "stages": ["source"]}))
    p, f = str(path), str(frames)
    commands = {
        "export": ["export", p, "-o", str(tmp_path / "x.onnx")],
        "export --onnx": ["export", "--onnx", p, "-o", str(tmp_path / "y.onnx")],
        "infer": ["infer", f, "--model", p, "--out", str(tmp_path / "inf"), "--quiet"],
        "evaluate": ["evaluate", p, "--data", "images", "--root", f],
        "pseudo-label": ["pseudo-label", p, "--data", "images", "--root", f, "--out", str(tmp_path / "pl")],
        "inspect": ["inspect", p, "--source", f"{cfg_path}:source", "--target", f],
        "adapt-bn": ["adapt-bn", p, f, "-o", str(tmp_path / "bn.pt")],
        "train --init": ["train", str(cfg_path), "--init", p, "--quiet"],
    }
    runner = CliRunner()
    for name, args in commands.items():
        result = runner.invoke(cli, args)
        assert result.exit_code not in (0, None), (name, result.output)
        assert str(path) in result.output and "--trust-checkpoint" in result.output, (name, result.output)
        assert not marker.exists(), f"sdca {name} ran the file's code"
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "bn.pt").exists()


def test_the_installed_cli_refuses_the_release_file_the_issue_tried(tmp_path):
    """The report's own case: `sdca export --onnx model_best.pth -o x.onnx`, as a user types it."""
    path, marker = trapped(tmp_path, "public")
    shutil.move(path, tmp_path / "model_best.pth")
    exe = shutil.which("sdca", path=os.path.dirname(sys.executable))
    run = subprocess.run([exe, "export", "--onnx", "model_best.pth", "-o", "x.onnx"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "refused" in run.stderr and "model_best.pth" in run.stderr, run.stderr
    assert not marker.exists() and not (tmp_path / "x.onnx").exists()


def test_trust_lifts_the_refusal_for_a_harmless_custom_class(tmp_path):
    model = small_model()
    path = tmp_path / "colleague.pt"
    save_checkpoint(str(path), model, extra={"note": Note("trained on the lab's rig")})
    with pytest.raises(UntrustedFileError, match=r"test_safe_loading\.Note"):
        load_model(str(path))
    loaded = load_model(str(path), trusted=True)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert read_checkpoint(str(path), trusted=True)["extra"]["note"].text == "trained on the lab's rig"

    runner = CliRunner()
    refused = runner.invoke(cli, ["export", str(path), "-o", str(tmp_path / "m.onnx"), "--no-check"])
    assert refused.exit_code != 0 and "Note" in refused.output and not (tmp_path / "m.onnx").exists()
    trusted = runner.invoke(cli, ["export", str(path), "-o", str(tmp_path / "m.onnx"), "--no-check",
                                  "--trust-checkpoint"])
    assert trusted.exit_code == 0, trusted.output
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_checkpoints_of_every_stage_hold_only_what_pytorchs_restricted_loader_allows(tiny_data):
    """Independent of sdca's reader: PyTorch's own scanner finds no global beyond its defaults in any file a run
    writes, and torch.load(weights_only=True) with no allow-list reads each of them."""
    from sdca.engine import Runner, load_config

    tmp, config = tiny_data
    Runner(load_config(None, [], **config), progress=False).train()
    files = sorted((tmp / "runs" / "tiny").rglob("*.pt"))
    names = {f"{p.parent.name}/{p.name}" for p in files}
    assert {"source/last.pt", "source/final.pt", "source/best.pt", "init-stats/final.pt", "adapt/last.pt",
            "adapt/final.pt", "self-train/final.pt"} <= names
    for p in files:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(p)) == [], p
        raw = torch.load(p, map_location="cpu", weights_only=True)
        assert raw["format_version"] == 2
    last = torch.load(tmp / "runs" / "tiny" / "adapt" / "last.pt", weights_only=True)
    assert set(last["extra"]["rng"]) >= {"python", "numpy", "torch"} and last["optimizer"]["state"]
    assert last["statistics"]["features"]["mean"].dtype == torch.float64


def test_a_format_1_checkpoint_still_loads_and_resumes_exactly(tiny_data):
    """tests/fixtures/checkpoint_format1: adapt/last.pt at step 2 of 3, written by the code before this change
    (format 1: NumPy's RNG tuple). Resuming it must end where an uninterrupted run of today's code ends."""
    from sdca.engine import Runner, load_config

    old = read_checkpoint(FIXTURE)
    assert old["format_version"] == 1 and old["step"] == 2 and isinstance(old["extra"]["rng"]["numpy"], tuple)
    tmp, config = tiny_data
    config = {**config, "model": {**config["model"], "width": 2}, "stages": ["source", "init-stats", "adapt"]}
    Runner(load_config(None, [], **{**config, "name": "straight"}), progress=False).train()
    resumed = {**config, "name": "resumed"}
    Runner(load_config(None, [], **{**resumed, "stages": ["source", "init-stats"]}), progress=False).train()
    (tmp / "runs" / "resumed" / "adapt").mkdir()
    shutil.copyfile(FIXTURE, tmp / "runs" / "resumed" / "adapt" / "last.pt")
    Runner(load_config(None, [], **resumed), progress=False).train()
    a = read_checkpoint(str(tmp / "runs" / "straight" / "adapt" / "final.pt"))
    b = read_checkpoint(str(tmp / "runs" / "resumed" / "adapt" / "final.pt"))
    assert a["step"] == b["step"] == 3 and b["format_version"] == 2
    # The fixture's first two steps ran on another CPU (an Intel Xeon; CI machines vary, AMD EPYC too), whose
    # float32 kernels round differently: its statistics agree with today's to the weights' tolerance, not to
    # the one-machine 1e-6 (measured on an AMD EPYC: 5e-8 absolute, 2e-5 relative on near-zero covariances).
    assert_same_training_state(a, b, statistics_tol=(1e-5, 1e-6))
