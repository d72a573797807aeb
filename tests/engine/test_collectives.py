"""sdca.collectives: tensors go where the backend needs them (NCCL: the process's GPU), and the guard the CPU
tests run with fails any collective sdca calls around it, which is what NCCL alone would catch."""
import os
import re

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
                for number, line in enumerate(open(path, encoding="utf-8"), 1):
                    if pattern.search(line):
                        offenders.append(f"{path}:{number}: {line.strip()}")
    assert not offenders, offenders
