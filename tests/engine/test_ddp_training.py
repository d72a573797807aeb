"""Training under torchrun with two CPU processes (gloo), the collective guard on (SDCA_STRICT_COLLECTIVES=1:
any torch.distributed collective that does not go through sdca.collectives fails, as NCCL would fail a CPU
tensor): one model on both ranks through every stage, evaluation equal to one process, two processes equal to
one process with the same global batch, an agreed stop when torchrun itself is interrupted, and every rank
stopping together on a non-finite loss or a failed data stream. Each launch has a timeout, and the process
group's own timeout is short, so nothing here can hang."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from sdca.engine import Runner, load_config
from sdca.engine.evaluator import evaluate
from sdca.models import load_model, read_checkpoint

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
TRAINING_STAGES = ("source", "adapt", "self-train")


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "SDCA_STRICT_COLLECTIVES": "1", "SDCA_DIST_TIMEOUT_MIN": "1"}


def torchrun_cmd(nproc=2):
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe, "--nproc-per-node", str(nproc), "--master-port", str(29000 + os.getpid() % 900)]


def write(tmp, config, name, **changes):
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "name": name, **changes}))
    return str(path)


def launch(tmp, cfg_path, mode="run", stages=(), expect_ok=True, timeout=240):
    out = tmp / f"out-{os.path.basename(cfg_path)}-{mode}"
    run = subprocess.run(torchrun_cmd() + [WORKER, cfg_path, str(out), mode, *stages], capture_output=True,
                         text=True, timeout=timeout, env=env())
    if expect_ok:
        assert run.returncode == 0, run.stderr[-4000:]
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, records, run


def assert_same_weights(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key}"


def test_two_ranks_hold_one_model_through_every_stage_and_evaluate_as_one_process(tiny_data):
    tmp, config = tiny_data
    # bn: train, so that each rank's running statistics really differ between the ranks' batches.
    config = {**config, "model": {**config["model"], "bn": "train"}, "data": {**config["data"], "batch_size": 1}}
    cfg = write(tmp, config, "two")
    out, records, _ = launch(tmp, cfg)
    checks = [[what for what, _ in r["checks"]] for r in records]
    assert checks[0] == checks[1]
    for stage in TRAINING_STAGES:
        assert any(w.startswith(f"the {stage} stage's starting model") for w in checks[0]), stage
        assert any(w.startswith(f"the {stage} stage's model at step") for w in checks[0]), stage
    assert "the init-stats statistics" in checks[0]
    assert [s for _, s in records[0]["checks"]] == [s for _, s in records[1]["checks"]]
    run_dir = tmp / "runs" / "two"
    for stage in TRAINING_STAGES:  # rank 1's model is the one rank 0 saved, to the bit
        saved = read_checkpoint(str(run_dir / stage / "final.pt"))["model"]["state_dict"]
        rank1 = torch.load(out / f"rank1-{stage}.pt", weights_only=True)
        assert_same_weights(saved, rank1, stage)
        assert_same_weights(saved, torch.load(out / f"rank0-{stage}.pt", weights_only=True), stage)

    # The two-process evaluation (each rank a shard) equals one process over the whole val set.
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    two = [r["eval"] for r in logged if r.get("stage") == "self-train" and "eval" in r][-1]
    cfg_obj = load_config(cfg)
    runner = Runner(cfg_obj, progress=False)
    one = evaluate(load_model(str(run_dir / "self-train" / "final.pt")), runner._val_dataset(),
                   device=torch.device("cpu"), size=cfg_obj.eval.size or cfg_obj.data.target_size,
                   scales=cfg_obj.eval.scales, flip=cfg_obj.eval.flip, resize=cfg_obj.data.resize, progress=False)
    assert two["images"] == one["images"] == 3
    assert two["mIoU"] == pytest.approx(one["mIoU"], abs=1e-6)
    for name, iou in one["IoU"].items():
        assert (iou is None and two["IoU"][name] is None) or two["IoU"][name] == pytest.approx(iou, abs=1e-6)

    # Self-training restarted from a fresh initialisation (ImageNet-style, as the R101 preset does): each rank
    # seeds its own head, so without the broadcast the ranks would train different models.
    fresh = tmp / "runs" / "fresh"
    shutil.copytree(run_dir / "pseudo-label", fresh / "pseudo-label")
    cfg2 = write(tmp, config, "fresh", method={**config["method"], "self_train_from_imagenet": True})
    out2, records2, _ = launch(tmp, cfg2, stages=["self-train"])
    assert [s for _, s in records2[0]["checks"]] == [s for _, s in records2[1]["checks"]]
    saved = read_checkpoint(str(fresh / "self-train" / "final.pt"))["model"]["state_dict"]
    assert_same_weights(saved, torch.load(out2 / "rank1-self-train.pt", weights_only=True), "fresh self-train")


def test_two_ranks_hold_one_student_teacher_projection_and_statistics_in_the_mean_teacher(tiny_data):
    """Stage mean-teacher under torchrun: each rank mixes and augments its own batch, yet the student, the EMA
    teacher, the projection head (initialised on each rank from its own seed, then rank 0's), its teacher and the
    pooled statistics are one copy on both ranks, at the start and the end, and rank 0's checkpoint is it."""
    tmp, config = tiny_data
    config = {**config, "stages": ["source", "mean-teacher"], "model": {**config["model"], "bn": "train"},
              "data": {**config["data"], "batch_size": 1, "val": None},
              "solver": {**config["solver"], "mean_teacher": {"iters": 3, "lr": 0.002}},
              "method": {**config["method"], "mean_teacher": {"contrast": "projection", "projection_dim": 8,
                                                              "alpha": 0.9, "threshold": 0.6}}}
    out, records, _ = launch(tmp, write(tmp, config, "mt"))
    checks = [[what for what, _ in r["checks"]] for r in records]
    assert checks[0] == checks[1]
    assert any(w.startswith("the mean-teacher stage's starting model") for w in checks[0])
    assert any(w.startswith("the mean-teacher stage's model at step 3") for w in checks[0])
    assert [s for _, s in records[0]["checks"]] == [s for _, s in records[1]["checks"]]
    final = read_checkpoint(str(tmp / "runs" / "mt" / "mean-teacher" / "final.pt"))
    assert_same_weights(final["model"]["state_dict"], torch.load(out / "rank1-mean-teacher.pt", weights_only=True),
                        "student")
    for name in ("teacher", "projection", "teacher_projection"):
        rank0 = torch.load(out / f"rank0-mean-teacher-{name}.pt", weights_only=True)
        rank1 = torch.load(out / f"rank1-mean-teacher-{name}.pt", weights_only=True)
        assert_same_weights(rank0, rank1, name)
        assert_same_weights(final["extra"]["modules"][name], rank1, name)
    assert float(final["statistics"]["projection"]["count"].sum()) > 0


def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_data):
    """Where the arithmetic says they must: frozen batch norm (no batch statistics), no Lovász (not a mean over
    pixels), no augmentation (so no draw depends on the process), and the same number of labelled pixels on every
    rank (every fabricated frame is 64 x 32 and fully labelled). Then the mean of the two ranks' mean gradients is
    the one process's mean gradient over both images, and SGD follows the same path up to float round-off."""
    tmp, config = tiny_data
    plain = {"jitter": False, "grayscale": 0.0, "blur": False, "flip": False}
    config = {**config, "stages": ["source"], "model": {**config["model"], "bn": "frozen"},
              "method": {**config["method"], "lambda_lov": 0.0},
              "solver": {**config["solver"], "source": {"iters": 6, "lr": 0.01}},
              "data": {**config["data"], "val": None, "stages": {"source": plain}}}
    one = {**config, "data": {**config["data"], "batch_size": 2}}
    two = {**config, "data": {**config["data"], "batch_size": 1}}
    Runner(load_config(None, [], **{**one, "name": "one"}), progress=False).train()
    launch(tmp, write(tmp, two, "two"))
    a = read_checkpoint(str(tmp / "runs" / "one" / "source" / "final.pt"))["model"]["state_dict"]
    b = read_checkpoint(str(tmp / "runs" / "two" / "source" / "final.pt"))["model"]["state_dict"]
    largest = max(float(v.abs().max()) for v in a.values() if v.is_floating_point())
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=1e-6 * largest, msg=key)


def test_torchrun_interrupted_stops_every_rank_after_one_step_and_resumes_exactly(tiny_data):
    tmp, config = tiny_data
    config = {**config, "stages": ["source"], "data": {**config["data"], "val": None, "batch_size": 1},
              "solver": {**config["solver"], "source": {"iters": 300, "lr": 0.005}, "checkpoint_period": 100000}}
    cfg = write(tmp, config, "stopped")
    base = torchrun_cmd() + ["-m", "sdca", "train", cfg, "--quiet"]
    proc = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    metrics = tmp / "runs" / "stopped" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # torchrun itself, as a user's `kill -INT` or a scheduler would
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    steps = [int(s) for s in __import__("re").findall(r"stopped by SIGINT after step (\d+)", err)]
    assert len(steps) == 2 and steps[0] == steps[1], err[-3000:]  # both ranks, the same step
    last = read_checkpoint(str(tmp / "runs" / "stopped" / "source" / "last.pt"))
    assert last["step"] == steps[0] < 300 and last["extra"]["world_size"] == 2
    assert not (tmp / "runs" / "stopped" / "source" / "final.pt").exists()

    resumed = subprocess.run(base, capture_output=True, text=True, timeout=240, env=env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run(torchrun_cmd() + ["-m", "sdca", "train", write(tmp, config, "straight"), "--quiet"],
                              capture_output=True, text=True, timeout=240, env=env())
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = read_checkpoint(str(tmp / "runs" / "straight" / "source" / "final.pt"))
    b = read_checkpoint(str(tmp / "runs" / "stopped" / "source" / "final.pt"))
    for key, value in a["model"]["state_dict"].items():
        torch.testing.assert_close(b["model"]["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    losses = {}
    for name in ("straight", "stopped"):
        lines = [json.loads(x) for x in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = {r["step"]: r["loss_ce"] for r in lines if "loss_ce" in r and r["step"] > steps[0]}
    assert losses["stopped"] and losses["stopped"].keys() <= losses["straight"].keys()
    for step, value in losses["stopped"].items():
        assert value == pytest.approx(losses["straight"][step], rel=1e-4), step


@pytest.mark.parametrize("mode,expected", [("nan", r"non-finite at step 3 on rank 1|is nan at step 3 on rank 1"),
                                           ("stream", r"rank 1 failed at step 2|the disk went away")])
def test_one_rank_failing_stops_both_at_the_same_step(tiny_data, mode, expected):
    import re

    tmp, config = tiny_data
    config = {**config, "stages": ["source"], "data": {**config["data"], "batch_size": 1},
              "solver": {**config["solver"], "source": {"iters": 50, "lr": 0.01}}}
    start = time.time()
    _, records, run = launch(tmp, write(tmp, config, mode), mode=mode, expect_ok=False, timeout=180)
    assert run.returncode != 0 and time.time() - start < 170
    for rank, record in enumerate(records):
        assert record["error"] is not None and re.search(expected, record["error"]["message"]), (rank, record)
    if mode == "nan":
        assert {r["error"]["type"] for r in records} == {"NonFiniteLoss"}
    assert not (tmp / "runs" / mode / "source" / "final.pt").exists()


def _amp_worker(rank, init, out):
    from sdca.engine.distributed import DistInfo
    from sdca.engine.steps import StepBase
    from sdca.models import build_model

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = build_model("deeplabv2_small", 19, width=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        step = StepBase(model, optimizer, torch.device("cpu"), None, DistInfo(rank, 2, rank))
        step.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # fp16's scaler, as on CUDA
        before = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.randn(1, 3, 32, 64)
        loss = model(x).logits.float().mean()
        if rank == 1:  # an overflow on one rank only
            loss = loss * float("inf")
        step.update(loss)
        torch.save({"changed": any(not torch.equal(before[k], v) for k, v in model.state_dict().items()),
                    "scale": float(step.scaler.get_scale())}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_an_overflow_on_one_rank_is_skipped_on_every_rank(tmp_path):
    mp.spawn(_amp_worker, args=(str(tmp_path / "init"), str(tmp_path / "state")), nprocs=2, join=True)
    states = [torch.load(f"{tmp_path / 'state'}.{r}", weights_only=True) for r in range(2)]
    assert not states[0]["changed"] and not states[1]["changed"]  # both skipped the step
    assert states[0]["scale"] == states[1]["scale"] == 512.0  # and both backed the scale off once


def test_a_forced_world_of_one_runs_every_collective_and_trains_the_same(tiny_data):
    """SDCA_FORCE_DISTRIBUTED=1 (how scripts/train_check.sh puts every collective on NCCL with one GPU): a process
    group of one, every agreement and all-reduce run (through the guard), and the result is the plain run's."""
    tmp, config = tiny_data
    config = {**config, "stages": ["source", "init-stats", "adapt"]}
    Runner(load_config(None, [], **{**config, "name": "plain"}), progress=False).train()
    exe = shutil.which("sdca", path=os.path.dirname(sys.executable))
    forced = subprocess.run([exe, "train", write(tmp, config, "forced"), "--quiet"], capture_output=True, text=True,
                            timeout=240, env={**env(), "SDCA_FORCE_DISTRIBUTED": "1", "MASTER_PORT": "29533"})
    assert forced.returncode == 0, forced.stderr[-3000:]
    a = read_checkpoint(str(tmp / "runs" / "plain" / "adapt" / "final.pt"))
    b = read_checkpoint(str(tmp / "runs" / "forced" / "adapt" / "final.pt"))
    for key, value in a["model"]["state_dict"].items():
        torch.testing.assert_close(b["model"]["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert b["extra"]["world_size"] == 1
