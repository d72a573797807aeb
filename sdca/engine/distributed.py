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
    forced: bool = False  # a process group of one (SDCA_FORCE_DISTRIBUTED=1): every collective still runs

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.forced

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
    to its own GPU from the start. Two switches for checking the multi-GPU path on fewer GPUs (scripts/
    train_check.sh): ``SDCA_DIST_BACKEND=gloo`` (several ranks may then share a GPU: gloo takes CUDA tensors,
    NCCL refuses two ranks on one device) and ``SDCA_FORCE_DISTRIBUTED=1`` (a process group even for a world of
    one, so that every collective runs, e.g. under NCCL on a single GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    forced = os.environ.get("SDCA_FORCE_DISTRIBUTED") == "1"
    if world <= 1 and not forced:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if os.environ.get("SDCA_STRICT_COLLECTIVES") == "1":
        collectives.install_guard()
    backend = os.environ.get("SDCA_DIST_BACKEND") or ("nccl" if device_type == "cuda" else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"SDCA_DIST_BACKEND must be nccl or gloo, got {backend!r}")
    if device_type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if world <= 1:  # forced: a group of one, without torchrun's rendezvous variables
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29531")
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        extra = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout(), **extra)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, forced=forced)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class BucketedGradients:
    """Gradient averaging overlapped with backward, without a per-step flat copy (what DDP's reducer does with
    ``gradient_as_bucket_view``, for a step that runs the model twice before one backward).

    Every parameter's ``.grad`` is a view into one of a few flat buckets (about ``bucket_mb`` each, filled in
    reverse parameter order, the order backward produces them). A parameter's post-accumulate hook counts it
    ready; when a bucket is complete its all-reduce starts, asynchronously, while backward goes on. ``finish``
    starts the buckets a step left incomplete (parameters it did not use), waits for all and divides by the world
    size. ``zero`` replaces ``optimizer.zero_grad``: the views must stay the parameters' gradients.
    """

    def __init__(self, model: torch.nn.Module, info: DistInfo, bucket_mb: float = 25.0):
        self.info = info
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets: List[dict] = []
        limit = int(bucket_mb * 2 ** 20)
        current: List[torch.nn.Parameter] = []
        for p in reversed(params):
            if current and (sum(q.numel() * q.element_size() for q in current) + p.numel() * p.element_size() > limit
                            or p.dtype != current[0].dtype or p.device != current[0].device):
                self._add_bucket(current)
                current = []
            current.append(p)
        if current:
            self._add_bucket(current)
        self.bucket_of = {id(p): b for b in self.buckets for p in b["params"]}
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def _add_bucket(self, params) -> None:
        flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.buckets.append({"params": params, "flat": flat, "pending": len(params), "work": None, "started": False})

    def zero(self) -> None:
        for b in self.buckets:
            b["flat"].zero_()
            b["pending"], b["work"], b["started"] = len(b["params"]), None, False
            storage = b["flat"].untyped_storage().data_ptr()
            for p in b["params"]:
                if p.grad is None or p.grad.untyped_storage().data_ptr() != storage:
                    raise RuntimeError("a gradient is no longer a view of its bucket (optimizer.zero_grad("
                                       "set_to_none=True) drops the views: zero them with BucketedGradients.zero)")

    def _start(self, bucket) -> None:
        bucket["started"] = True
        bucket["work"] = collectives.all_reduce_async(bucket["flat"])

    def _ready(self, p) -> None:
        bucket = self.bucket_of[id(p)]
        bucket["pending"] -= 1
        if bucket["pending"] == 0 and not bucket["started"]:
            self._start(bucket)

    def finish(self) -> None:
        for b in self.buckets:
            if not b["started"]:
                self._start(b)
        for b in self.buckets:
            if b["work"] is not None:
                b["work"].wait()
            b["flat"].div_(self.info.world_size)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


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
