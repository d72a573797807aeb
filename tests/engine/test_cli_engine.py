"""train / evaluate / pseudo-label through the installed `sdca` entry point; SIGINT saves and resumes."""
import json
import signal
import subprocess
import time

import pytest
import yaml

from sdca.cli import main
from sdca.models import read_checkpoint
from tests.common_utils import run_sdca, sdca_exe


def sdca(*args, timeout=300):
    return run_sdca(*args, timeout=timeout)


# Every registered command that parses its own options (serve and ros hand theirs to sdca_serve, whose help is
# tested with it).
@pytest.mark.parametrize("command", sorted(name for name, c in main.commands.items() if c.add_help_option))
def test_every_command_has_help(command):
    out = sdca(command, "--help")
    assert out.returncode == 0 and "Usage: sdca " + command in out.stdout
    assert len(out.stdout.splitlines()) > 5


def write_config(tmp, config, **changes):
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump({**config, **changes}))
    return str(path)


def test_train_evaluate_pseudo_label_commands(tiny_data):
    tmp, config = tiny_data
    cfg = write_config(tmp, config)
    out = sdca("train", cfg, "--quiet", "--set", "solver.self_train.iters=1")
    assert out.returncode == 0, out.stderr
    assert "finished stages source, init-stats, adapt, pseudo-label, self-train" in out.stdout
    ckpt = tmp / "runs" / "tiny" / "adapt" / "final.pt"
    result = tmp / "eval.json"
    out = sdca("evaluate", str(ckpt), "--data", "folder", "--root", str(tmp / "realval" / "images"), "--labels",
               str(tmp / "realval" / "labels"), "--mapping", str(tmp / "mapping.yaml"), "--size", "64", "32",
               "--pdd", "--flip", "--json", str(result), "--workers", "0")
    assert out.returncode == 0, out.stderr
    summary = json.loads(result.read_text())
    assert "mIoU" in out.stdout and 0 <= summary["mIoU"] <= 1 and summary["images"] == 3
    assert summary["PDD"]["sky"] is not None
    labels = tmp / "pl"
    out = sdca("pseudo-label", str(ckpt), "--data", "images", "--root", str(tmp / "real" / "images"), "--out",
               str(labels), "--workers", "0")
    assert out.returncode == 0, out.stderr
    assert json.loads((labels / "thresholds.json").read_text())["images"] == 6
    assert (labels / "seq1" / "f005.png").is_file()


def test_bad_config_is_a_clear_error(tiny_data):
    tmp, config = tiny_data
    out = sdca("train", write_config(tmp, config), "--set", "solver.adapt.itres=3")
    assert out.returncode != 0 and "did you mean solver.adapt.iters" in out.stderr
    out = sdca("train", "no_such_preset")
    assert out.returncode != 0 and "neither a config file nor a preset" in out.stderr


def test_sigint_saves_a_checkpoint_and_the_run_resumes(tiny_data):
    tmp, config = tiny_data
    cfg = write_config(tmp, config, stages=["source"],
                       solver={**config["solver"], "source": {"iters": 100000, "lr": 0.01},
                               "checkpoint_period": 100000})
    proc = subprocess.Popen([sdca_exe(), "train", cfg, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp / "runs" / "tiny" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err and "resume" in err
    last = read_checkpoint(str(tmp / "runs" / "tiny" / "source" / "last.pt"))
    stopped_at = last["step"]
    assert 3 <= stopped_at < 100000
    resumed = sdca("train", cfg, "--quiet", "--set", f"solver.source.iters={stopped_at + 2}")
    assert resumed.returncode == 0, resumed.stderr
    final = read_checkpoint(str(tmp / "runs" / "tiny" / "source" / "final.pt"))
    assert final["step"] == stopped_at + 2
