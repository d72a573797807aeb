"""torch.distributed for training: set-up from torchrun's environment, rank-0 gating, one model on every rank,
gradient averaging, and the per-step agreements (stop, non-finite loss, data stream) that keep ranks in step.

Every collective goes through :mod:`sdca.collectives` (the backend's device). The process-group timeout is
``SDCA_DIST_TIMEOUT_MIN`` minutes (default 60): it bounds the rank-0-only work the others wait for in a barrier
(pseudo-labelling a whole target set, FADA's class sets on first use), which PyTorch's default 10 minutes does
not cover on a slow disk.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from .. import collectives

DEFAULT_TIMEOUT_MIN = 60.0


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def timeout() -> datetime.timedelta:
    raw = os.environ.get("SDCA_DIST_TIMEOUT_MIN", str(DEFAULT_TIMEOUT_MIN))
    try:
        minutes = float(raw)
    except ValueError:
        raise ValueError(f"SDCA_DIST_TIMEOUT_MIN must be a number of minutes, got {raw!r}") from None
    return datetime.timedelta(minutes=minutes)


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a single process otherwise.

    On CUDA the device is set before the group is made and named to it (``device_id``), so NCCL binds each rank
    to its own GPU from the start."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if os.environ.get("SDCA_STRICT_COLLECTIVES") == "1":
        collectives.install_guard()
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", timeout=timeout(), device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo", timeout=timeout())
    elif device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(model: torch.nn.Module, info: DistInfo) -> None:
    """All-reduce the mean of every gradient, in one flat buffer.

    Used instead of a DistributedDataParallel wrapper because an adaptation step runs the model twice (source,
    then target) before one backward, which DDP's reducer does not allow without extra machinery.
    """
    if not info.enabled:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    collectives.all_reduce(flat)
    flat.div_(info.world_size)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------- one model everywhere
def broadcast_module(module: torch.nn.Module, info: DistInfo, buffers_only: bool = False) -> None:
    """Rank 0's parameters (unless ``buffers_only``) and buffers on every rank: a freshly initialised head, each
    rank's own batch-norm running statistics."""
    if not info.enabled:
        return
    with torch.no_grad():
        tensors = list(module.buffers()) if buffers_only else list(module.parameters()) + list(module.buffers())
        for t in tensors:
            collectives.broadcast(t.data, src=0)


def broadcast_tensors(tensors: List[torch.Tensor], info: DistInfo) -> None:
    if info.enabled:
        for t in tensors:
            collectives.broadcast(t, src=0)


def checksum(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Two float64 numbers that differ when any value (or its place) differs: the sum, and the sum weighted by
    position within and across tensors."""
    total = torch.zeros(2, dtype=torch.float64)
    for i, t in enumerate(tensors):
        v = t.detach().reshape(-1).to("cpu", torch.float64)
        weights = torch.arange(1, v.numel() + 1, dtype=torch.float64) / max(v.numel(), 1) + i
        total += torch.stack([v.sum(), (v * weights).sum()])
    return total


def check_ranks_agree(tensors: List[torch.Tensor], info: DistInfo, what: str) -> None:
    """Raise on every rank when ranks hold different values of ``tensors`` (the checksums of all ranks are
    gathered, so each rank sees the disagreement and none is left waiting)."""
    if not info.enabled:
        return
    sums = collectives.all_gather(checksum(tensors))
    if any(not torch.equal(s, sums[0]) for s in sums[1:]):
        values = ", ".join(f"rank {r}: {s[0].item():.17g}" for r, s in enumerate(sums))
        raise RuntimeError(f"ranks disagree on {what} ({values}): the processes no longer train one model")


def module_tensors(module: torch.nn.Module) -> List[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


# ----------------------------------------------------------------------------------- per-step agreements
def agree_max(value: int, info: DistInfo) -> int:
    """The largest of every rank's ``value`` (one tiny all-reduce); ``value`` itself in a single process."""
    if not info.enabled:
        return value
    flag = torch.tensor([value], dtype=torch.int64)
    collectives.all_reduce(flag, op="max")
    return int(flag.item())


def agree_stop(requested: Optional[str], info: DistInfo) -> Optional[str]:
    """The stop every rank takes after this step: a signal any rank received (SIGTERM over SIGINT when both)."""
    import signal

    if not info.enabled:
        return requested
    number = agree_max(int(signal.Signals[requested]) if requested else 0, info)
    return signal.Signals(number).name if number else None
