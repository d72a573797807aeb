"""sdca.collectives: tensors go where the backend needs them (NCCL: the process's GPU), and the guard the CPU
tests run with fails any collective sdca calls around it, which is what NCCL alone would catch."""
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sdca
from sdca import collectives

SDCA_DIR = os.path.dirname(sdca.__file__)


@pytest.mark.parametrize("device,backend,index,expected", [
    ("cpu", "nccl", 0, "cuda:0"), ("cpu", "nccl", 3, "cuda:3"), ("cuda:1", "nccl", 1, "cuda:1"),
    ("cpu", "gloo", None, "cpu"), ("cuda:2", "gloo", None, "cuda:2")])
def test_placement_follows_what_each_backend_accepts(device, backend, index, expected):
    # NCCL's documented rule (CUDA tensors only) and gloo's (CPU and CUDA).
    assert collectives.placement(torch.device(device), backend, index) == torch.device(expected)


def test_outside_a_process_group_every_collective_is_a_no_op():
    t = torch.arange(3.0)
    assert collectives.all_reduce(t) is t and torch.equal(t, torch.arange(3.0))
    assert collectives.all_gather(t) == [t]


def _guard_worker(rank, init, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        collectives.install_guard()
        t = torch.ones(2)
        collectives.all_reduce(t, op="max")  # routed: allowed
        dist.all_reduce(t)  # from a test file: allowed (the guard is about sdca's own code)
        inside = os.path.join(SDCA_DIR, "metrics.py")  # as if a line of sdca/metrics.py called it directly
        try:
            exec(compile("dist.all_reduce(t)", inside, "exec"), {"dist": dist, "t": t})
            result = "allowed"
        except AssertionError as exc:
            result = str(exc)
        with open(out, "w") as f:
            f.write(result)
    finally:
        dist.destroy_process_group()


def test_the_guard_fails_a_direct_collective_from_sdca_code(tmp_path):
    out = tmp_path / "result"
    mp.spawn(_guard_worker, args=(str(tmp_path / "init"), str(out)), nprocs=1, join=True)
    text = out.read_text()
    assert "called directly" in text and "metrics.py" in text and "sdca.collectives" in text


def test_no_sdca_module_calls_a_tensor_collective_directly():
    pattern = re.compile(r"\bdist\.(" + "|".join(collectives.GUARDED) + r")\(")
    offenders = []
    for folder, _, files in os.walk(SDCA_DIR):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and path != collectives.__file__:
                for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
                    if pattern.search(line):
                        offenders.append(f"{path}:{number}: {line.strip()}")
    assert not offenders, offenders


def _bucket_worker(rank, init, out):
    from sdca.engine.distributed import BucketedGradients, DistInfo
    from sdca.models import build_model

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # one model on both ranks
        model = build_model("deeplabv2_small", 19, width=2, bn="frozen")
        torch.manual_seed(100 + rank)  # each rank its own batch
        x = torch.randn(2, 3, 32, 48)
        # Each rank's own gradient, without any averaging, for the test to average itself.
        model.zero_grad(set_to_none=True)
        out_a, out_b = model(x), model(x.flip(-1))  # two forwards before one backward, as the adaptation step
        (out_a.logits.square().mean() + out_b.features.mean()).backward()
        local = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        grads = BucketedGradients(model, DistInfo(rank, 2, rank), bucket_mb=0.01)  # many buckets
        for _ in range(2):  # twice: zero() must reset what the first pass left
            grads.zero()
            out_a, out_b = model(x), model(x.flip(-1))
            (out_a.logits.square().mean() + out_b.features.mean()).backward()
            grads.finish()
        torch.save({"local": local, "averaged": {n: p.grad.clone() for n, p in model.named_parameters()},
                    "buckets": len(grads.buckets)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_bucketed_gradients_are_the_mean_of_the_ranks_gradients(tmp_path):
    mp.spawn(_bucket_worker, args=(str(tmp_path / "init"), str(tmp_path / "g")), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{tmp_path / 'g'}.{r}", weights_only=True) for r in range(2))
    assert r0["buckets"] > 3
    for name, g in r0["local"].items():
        mean = (g.double() + r1["local"][name].double()) / 2
        assert torch.equal(r0["averaged"][name], r1["averaged"][name]), name  # the ranks agree to the bit
        torch.testing.assert_close(r0["averaged"][name].double(), mean, rtol=1e-5, atol=1e-7, msg=name)
