"""Every torch.distributed collective sdca runs goes through here, on a device the backend accepts.

NCCL takes CUDA tensors only; gloo takes CPU and CUDA ones. A statistic built on the CPU (a confusion matrix, a
histogram, a flag) and all-reduced under NCCL fails at run time, and only on a multi-GPU machine. Routing every
collective through :func:`all_reduce` / :func:`broadcast` / :func:`all_gather`, which move a tensor to the
device the backend needs and back, makes that impossible; ``SDCA_STRICT_COLLECTIVES=1`` (set by the CPU tests)
installs :func:`install_guard`, which fails any collective called from elsewhere, so CI catches a direct call
that only NCCL would reject. Below ``method``, ``metrics`` and ``engine``, which all use it; a no-op outside a
process group.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import List, Optional

import torch
import torch.distributed as dist

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}
GUARDED = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
           "reduce_scatter_tensor", "all_to_all", "gather", "scatter")


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def placement(tensor_device: torch.device, backend: str, cuda_index: Optional[int]) -> torch.device:
    """Where a tensor must be for ``backend``'s collectives: NCCL needs this process's GPU; gloo takes a CPU or
    CUDA tensor where it is; other backends are left as they are."""
    if backend == "nccl" and tensor_device.type != "cuda":
        return torch.device("cuda", cuda_index or 0)
    return tensor_device


def _device_for(tensor: torch.Tensor) -> torch.device:
    backend = str(dist.get_backend())
    index = torch.cuda.current_device() if backend == "nccl" else None
    return placement(tensor.device, backend, index)


def _run(name: str, tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``dist.<name>(tensor, ...)`` in place on ``tensor``, through a copy on the backend's device if needed."""
    device = _device_for(tensor)
    if device == tensor.device:
        getattr(dist, name)(tensor, *args, **kwargs)
        return tensor
    moved = tensor.to(device)
    getattr(dist, name)(moved, *args, **kwargs)
    tensor.copy_(moved)
    return tensor


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In place; a no-op outside a process group."""
    if not active():
        return tensor
    return _run("all_reduce", tensor, op=getattr(dist.ReduceOp, _OPS[op]), group=group)


def all_reduce_async(tensor: torch.Tensor, group=None):
    """Start a sum all-reduce of ``tensor`` in place and return its work handle (``.wait()``), or None when the
    tensor is not on a device the backend takes (then it is reduced at once, through a copy) or outside a group."""
    if not active():
        return None
    if _device_for(tensor) != tensor.device:
        all_reduce(tensor, group=group)
        return None
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)


def broadcast(tensor: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """In place, from rank ``src``; a no-op outside a process group."""
    if not active():
        return tensor
    return _run("broadcast", tensor, src=src, group=group)


def all_gather(tensor: torch.Tensor, group=None) -> List[torch.Tensor]:
    """Every rank's ``tensor`` (same shape everywhere), on ``tensor``'s device; ``[tensor]`` outside a group."""
    if not active():
        return [tensor]
    device = _device_for(tensor)
    local = tensor.to(device)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return [t.to(tensor.device) for t in out]


def install_guard() -> None:
    """Make every torch.distributed collective called from outside this module fail (once per process).

    What reaches torch from here has been put on the backend's device; anything else (a metric or statistic
    all-reduced directly) would pass gloo on the CPU and fail under NCCL on a GPU node."""
    if getattr(dist, "_sdca_guarded", False):
        return
    here = os.path.abspath(__file__)
    package = os.path.dirname(here) + os.sep

    def guarded(name, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            caller = os.path.abspath(sys._getframe(1).f_code.co_filename)
            if caller != here and caller.startswith(package):
                raise AssertionError(f"torch.distributed.{name} called directly from {caller}: route it through "
                                     "sdca.collectives, which puts the tensor where the backend (NCCL: CUDA only) "
                                     "needs it")
            return fn(*args, **kwargs)
        return call

    for name in GUARDED:
        if hasattr(dist, name):
            setattr(dist, name, guarded(name, getattr(dist, name)))
    dist._sdca_guarded = True
