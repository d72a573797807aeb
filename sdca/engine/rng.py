"""The random-number state a checkpoint carries for an exact resume, in plain types and tensors only.

Plain types are what a weights-only read can load without allowing any class (see
:mod:`sdca.models.serialization`): Python's state is a tuple of ints, NumPy's MT19937 key becomes an int64
tensor, torch's states are byte tensors. CUDA's state is the current device's only: a run resumed on a
machine with fewer (or more) GPUs restores what this process used, instead of failing on devices it lacks.
Format-1 checkpoints (NumPy's state tuple, CUDA's state of every visible device) are still restored.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
        state["cuda_device"] = torch.cuda.current_device()
    return state


def restore(state: dict) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        np.random.set_state({"bit_generator": np_state["bit_generator"],
                             "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                             "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    else:  # format 1: np.random.get_state()'s tuple
        np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):  # format 1: one state per device visible when it was saved
        index = torch.cuda.current_device()
        if index >= len(cuda):
            return  # this device had no state then: it keeps its seed
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda)

