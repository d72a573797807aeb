"""How big a SynthDrive run is: frame counts, steps per stage, batch. Named fields in place of the positional
``{"frames": (source, target, val), "iters": (source, adapt, self-train), "batch": b}`` dicts, which
:meth:`Plan.of` still reads."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union


@dataclass(frozen=True)
class Plan:
    source_frames: int
    target_frames: int
    val_frames: int  # and as many test frames
    source_iters: int
    adapt_iters: int
    self_train_iters: int
    batch: int  # per domain
    mean_teacher_iters: Optional[int] = None  # None: adapt + self-train (the two stages it replaces)

    @classmethod
    def of(cls, plan: Union["Plan", dict]) -> "Plan":
        """A Plan, or the dict form the experiment and scripts wrote before."""
        if isinstance(plan, Plan):
            return plan
        (ns, nt, nv), (its, ita, itt) = plan["frames"], plan["iters"]
        return cls(ns, nt, nv, its, ita, itt, plan["batch"], plan.get("mt_iters"))

    @property
    def mt_iters(self) -> int:
        return self.adapt_iters + self.self_train_iters if self.mean_teacher_iters is None else self.mean_teacher_iters

    def scaled(self, factor: int) -> "Plan":
        """Every stage's steps times ``factor`` (the GPU script's longer schedule); frames and batch as they are."""
        return replace(self, source_iters=self.source_iters * factor, adapt_iters=self.adapt_iters * factor,
                       self_train_iters=self.self_train_iters * factor, mean_teacher_iters=self.mt_iters * factor)

    def to_dict(self) -> dict:
        """The dict form (JSON summaries)."""
        return {"frames": [self.source_frames, self.target_frames, self.val_frames],
                "iters": [self.source_iters, self.adapt_iters, self.self_train_iters], "batch": self.batch,
                "mt_iters": self.mt_iters}
