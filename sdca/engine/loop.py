"""The training loop: one step function, everything else a hook (detectron2's engine, reduced).

LR schedule, logging, evaluation, checkpointing and signal handling are hooks, so they compose instead of
piling into one loop. Hooks keep no state of their own across a resume: what a resumed stage needs (the step,
the optimizer, the sample positions, the random generators) the checkpoint hook saves from the step and the
runner, and the LR schedule is a function of the step.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Dict, List, Optional

import torch


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; the message names the step and the term."""


class StopRequested(Exception):
    pass


class HookBase:
    trainer: "TrainLoop" = None

    def before_train(self):
        pass

    def before_step(self):
        pass

    def after_step(self):
        pass

    def after_train(self):
        pass


class TrainLoop:
    """Runs ``step.run_step(iteration)`` from ``start_iter`` to ``max_iter`` between the hooks' calls.

    ``step.run_step`` returns the loss terms of the iteration as floats. A stop requested by a signal ends
    the loop after the current step (the checkpoint hook saves first); ``stopped_by`` then names the signal.
    The request is read once per step, before the after-step hooks, and only that reading ends the loop: a
    signal landing while the hooks run (after the checkpointer has looked) would otherwise end the loop with
    no checkpoint of the last step; it is honoured at the end of the next step instead.
    """

    def __init__(self, step, hooks: List[HookBase], max_iter: int, start_iter: int = 0, agree_stop=None):
        """``agree_stop(requested) -> agreed``: under torch.distributed, the stop every rank takes after this
        step (a signal reaches each rank at its own moment; all must stop after the same step)."""
        self.step, self.hooks, self.max_iter, self.iter = step, hooks, max_iter, start_iter
        self.agree_stop = agree_stop
        self.start_iter = start_iter
        self.losses: Dict[str, float] = {}
        self.stop_requested: Optional[str] = None
        self.stopped_by: Optional[str] = None
        self.failed = False

    @property
    def done(self) -> bool:
        return self.iter >= self.max_iter

    def train(self) -> None:
        for hook in self.hooks:
            hook.trainer = self
        for hook in self.hooks:
            hook.before_train()
        try:
            while self.iter < self.max_iter and self.stopped_by is None:
                for hook in self.hooks:
                    hook.before_step()
                self.losses = self.step.run_step(self.iter)
                self.iter += 1
                # Under DDP another rank's signal stops this one too, after this same step.
                self.stopped_by = self.agree_stop(self.stop_requested) if self.agree_stop else self.stop_requested
                for hook in self.hooks:
                    hook.after_step()
        except BaseException:
            self.failed = True
            raise
        finally:
            for hook in self.hooks:
                hook.after_train()


def check_finite(losses: Dict[str, torch.Tensor], iteration: int, dist_info=None) -> None:
    """Raise NonFiniteLoss naming the step and the first non-finite term (before any weight is changed).

    Under torch.distributed every rank learns (one tiny all-reduce) whether any rank saw one, and all raise
    at the same step, the message naming the rank: a rank that stopped alone would leave the others waiting
    in the gradient all-reduce until the process-group timeout."""
    from .distributed import agree_max

    bad = None
    values = [v.detach().float().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v))
              for v in losses.values()]
    if values and not bool(torch.isfinite(torch.stack([v.to(values[0].device) for v in values])).all()):  # one sync
        bad = next((name, float(v)) for name, v in zip(losses, values) if not math.isfinite(float(v)))
    enabled = dist_info is not None and dist_info.enabled
    where = f" on rank {dist_info.rank}" if enabled else ""
    if enabled:
        worst = agree_max(dist_info.rank + 1 if bad else 0, dist_info)
        if worst and bad is None:
            raise NonFiniteLoss(f"a loss term is non-finite at step {iteration + 1} on rank {worst - 1}; every rank "
                                "stopped before the update, and the last checkpoint holds the last good weights")
    if bad is not None:
        raise NonFiniteLoss(f"loss term {bad[0]} is {bad[1]} at step {iteration + 1}{where}; the run stopped before "
                            "the update, and the last checkpoint holds the last good weights")


class LRSchedule(HookBase):
    """Poly schedule: lr = base x (1 - it / schedule_iters) ^ power, per parameter group (with its multiplier),
    after an optional linear warm-up (mmcv's rule, as DAFormer's poly10warm): for it < warmup_iters the poly
    value is scaled by 1 - (1 - it / warmup_iters)(1 - warmup_ratio)."""

    def __init__(self, optimizer, base_lr: float, schedule_iters: int, power: float, warmup_iters: int = 0,
                 warmup_ratio: float = 1e-6):
        self.optimizer, self.base_lr, self.schedule_iters, self.power = optimizer, base_lr, schedule_iters, power
        self.warmup_iters, self.warmup_ratio = warmup_iters, warmup_ratio

    def factor(self, it: int) -> float:
        factor = max(0.0, 1.0 - it / max(1, self.schedule_iters)) ** self.power
        if it < self.warmup_iters:
            factor *= 1.0 - (1.0 - it / self.warmup_iters) * (1.0 - self.warmup_ratio)
        return factor

    def before_step(self):
        factor = self.factor(self.trainer.iter)
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * group.get("lr_mult", 1.0) * factor


class SignalHandler(HookBase):
    """SIGINT / SIGTERM request a stop after the current step instead of killing the process mid-write; a second
    signal aborts at once.

    Under torchrun a Ctrl-C reaches each worker twice (from the terminal, and forwarded by the agent), and
    ``kill -INT`` of the agent arrives as its forwarded signal: a second signal within ``duplicate_window_s``
    of the first is taken as that duplicate, not as a second request, so that the stop checkpoint is written.
    """

    def __init__(self, enabled: bool = True, duplicate_window_s: Optional[float] = None):
        self.enabled, self.previous = enabled, {}
        if duplicate_window_s is None:
            duplicate_window_s = 2.0 if "TORCHELASTIC_RUN_ID" in os.environ else 0.0
        self.duplicate_window_s, self.first_at = duplicate_window_s, None

    def before_train(self):
        if not self.enabled:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.first_at is not None and now - self.first_at < self.duplicate_window_s:
            return  # the same request delivered twice (torchrun)
        if self.first_at is not None:  # a second signal: give up
            raise KeyboardInterrupt
        self.first_at = now
        self.trainer.stop_requested = signal.Signals(signum).name

    def after_train(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class Checkpointer(HookBase):
    """Saves ``last.pt`` every ``period`` steps, when a stop is requested, and at the end (atomic writes)."""

    def __init__(self, save_fn, period: int, enabled: bool = True):
        self.save_fn, self.period, self.enabled = save_fn, period, enabled
        self.last_saved: Optional[int] = None

    def after_step(self):
        t = self.trainer
        if self.enabled and (t.iter % self.period == 0 or t.stopped_by is not None or t.done):
            self.save_fn(t.iter)
            self.last_saved = t.iter


class MetricsLogger(HookBase):
    """A progress bar with ETA and the loss terms, one JSON line per ``period`` steps, TensorBoard if present."""

    def __init__(self, path: Optional[str], stage: str, period: int, enabled: bool = True, tensorboard_dir=None,
                 progress: bool = True):
        self.path, self.stage, self.period, self.enabled = path, stage, period, enabled
        self.progress = progress  # the bar only: metrics are logged either way
        self.tensorboard_dir, self.writer, self.bar, self.sums, self.counts = tensorboard_dir, None, None, {}, {}

    def before_train(self):
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        t = self.trainer
        self.bar = tqdm(total=t.max_iter, initial=t.iter, desc=self.stage, dynamic_ncols=True, leave=True,
                        disable=not self.progress)
        self.start = time.time()
        if self.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(self.tensorboard_dir)
            except ImportError:  # tensorboard is optional
                self.writer = None

    def after_step(self):
        if not self.enabled:
            return
        t = self.trainer
        for k, v in t.losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach() if isinstance(v, torch.Tensor) else v)
            self.counts[k] = self.counts.get(k, 0) + 1  # per key: diagnostics come only on some steps
        self.bar.update(1)
        if t.iter % self.period == 0 or t.done or t.stopped_by:
            means = {k: float(v) / self.counts[k] for k, v in self.sums.items()}  # the period's one read-back
            self.bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in means.items() if k.startswith("loss_")})
            record = {"stage": self.stage, "step": t.iter, **means, "time": round(time.time() - self.start, 2)}
            if self.path:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if self.writer is not None:
                for k, v in means.items():
                    self.writer.add_scalar(f"{self.stage}/{k}", v, t.iter)
            self.sums, self.counts = {}, {}

    def after_train(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
