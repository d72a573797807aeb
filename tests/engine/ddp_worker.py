"""One torchrun worker for tests/engine/test_ddp_training.py (not a test module itself).

    torchrun --nproc-per-node N ddp_worker.py CONFIG.yaml OUT MODE [STAGE ...]

MODE: run (train the stages), nan (rank 1's Lovász term is NaN at step 3), stream (rank 1's source stream fails
at step 2). Each rank writes OUT/rank<R>.json: every rank-agreement check the runner made (what, checksum), the
exception it ended with (type, message, step), and OUT/rank<R>-<stage>.pt: its model's state at each training
stage's end (and OUT/rank<R>-<stage>-<name>.pt of each module a stage keeps beside it, such as the mean
teacher), so the test compares the ranks' weights itself.
"""
import json
import os
import sys

import torch

import sdca.engine.runner as runner_module
from sdca.engine import load_config
from sdca.engine.distributed import checksum
from sdca.models import atomic_save

config, out, mode, *stages = sys.argv[1:]
os.makedirs(out, exist_ok=True)
rank = int(os.environ["RANK"])
record = {"checks": [], "error": None}
real_check = runner_module.check_ranks_agree


def recording_check(tensors, info, what):
    record["checks"].append([what, checksum(tensors).tolist()])
    real_check(tensors, info, what)


runner_module.check_ranks_agree = recording_check

if mode == "nan" and rank == 1:
    import sdca.engine.steps as steps

    real_lovasz, calls = steps.lovasz_softmax, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real_lovasz(*args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value
    steps.lovasz_softmax = poisoned

if mode == "stream" and rank == 1:
    import sdca.engine.builders as builders

    real_next, calls = builders.Stream.__next__, {"n": 0}

    def failing(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("the disk went away")
        return real_next(self)
    builders.Stream.__next__ = failing


class Recording(runner_module.Runner):
    def _train_stage(self, stage, model, solver, make_step, statistics=None, modules=None, trained=()):
        super()._train_stage(stage, model, solver, make_step, statistics, modules, trained)
        atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f"{out}/rank{rank}-{stage}.pt")
        for name, module in (modules or {}).items():  # a teacher, a projection head: one copy on every rank too
            atomic_save({k: v.detach().cpu() for k, v in module.state_dict().items()},
                        f"{out}/rank{rank}-{stage}-{name}.pt")


try:
    Recording(load_config(config), progress=False).train(stages or None)
except BaseException as exc:
    record["error"] = {"type": type(exc).__name__, "message": str(exc), "step": getattr(exc, "step", None)}
    raise
finally:
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(record, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
