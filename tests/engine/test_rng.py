"""The RNG state a checkpoint carries: plain types only, an exact replay, format 1 still restored, and a CUDA
state list longer than the devices present (a run resumed on a machine with fewer GPUs) restored without error."""
import random

import numpy as np
import pytest
import torch

from sdca.engine import rng


def draws():
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_capture_restore_replays_every_generator():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state: it must survive too
    state = rng.capture()
    first = draws()
    draws()
    rng.restore(state)
    assert draws() == first
    assert isinstance(state["numpy"]["key"], torch.Tensor) and state["numpy"]["key"].dtype == torch.int64


def test_a_format_1_state_still_restores():
    np.random.seed(5)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    first = draws()
    rng.restore(old)
    assert draws() == first


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as a machine with GPUs would show it, recording what is restored (the CPU has none)."""
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: seen.append(s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("restores every device"))
    return monkeypatch, seen


def test_a_longer_cuda_state_list_restores_the_current_device_only(fake_cuda):
    monkeypatch, seen = fake_cuda
    states = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]  # saved on a 4-GPU node
    base = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    rng.restore({**base, "cuda": states})
    assert len(seen) == 1 and torch.equal(seen[0], states[1])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 6)  # a device that did not exist then
    rng.restore({**base, "cuda": states})
    assert len(seen) == 1
    rng.restore({**base, "cuda": states[2], "cuda_device": 2})  # format 2: one state, this process's
    assert len(seen) == 2 and torch.equal(seen[1], states[2])
