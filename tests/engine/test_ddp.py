"""Two CPU processes (gloo) under torchrun: identical weights and statistics on both ranks, and statistics equal
to one process fed both ranks' batches."""
import os
import shutil
import subprocess
import sys

import torch
import torch.nn.functional as F

from sdca.engine import Runner, load_config
from sdca.models import load_torch_file

SCRIPT = r'''
import sys, torch
from sdca.engine import Runner, load_config
from sdca.engine.runner import Runner as Base
import yaml

cfg = load_config(sys.argv[1])
out = sys.argv[2]

class Capturing(Base):
    def _train_stage(self, stage, model, solver, make_step, statistics=None):
        super()._train_stage(stage, model, solver, make_step, statistics)
        torch.save({"model": model.state_dict(), "stats": {k: v.state_dict() for k, v in statistics.items()}},
                   f"{out}/rank{self.dist.rank}.pt")

Capturing(cfg, progress=False, init_checkpoint=sys.argv[3]).train(["adapt"])
'''


def torchrun(tmp, config, init, tag):
    import yaml

    cfg_path = tmp / f"{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump({**config, "name": tag}))
    script = tmp / "ddp_adapt.py"
    script.write_text(SCRIPT)
    out = tmp / tag
    out.mkdir()
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([exe, "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000),
                          str(script), str(cfg_path), str(out), str(init)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return [load_torch_file(str(out / f"rank{r}.pt")) for r in range(2)]


def test_ddp_adapt_ranks_agree_and_statistics_pool_both_ranks(tiny_data):
    tmp, config = tiny_data
    config = {**config, "data": {**config["data"], "batch_size": 1}}
    Runner(load_config(None, [], **{**config, "stages": ["source", "init-stats"]}), progress=False).train()
    init = tmp / "runs" / "tiny" / "init-stats" / "final.pt"

    # lr > 0: after a few steps of averaged gradients both ranks hold the same weights and statistics.
    trained = {**config, "solver": {**config["solver"], "adapt": {"iters": 3, "lr": 0.01}}}
    r0, r1 = torchrun(tmp, trained, init, "trained")
    for key in r0["model"]:
        assert torch.equal(r0["model"][key], r1["model"][key]), key
    for level in ("features", "outputs"):
        for key in ("count", "mean", "covariance"):
            assert torch.equal(r0["stats"][level][key], r1["stats"][level][key])

    # lr = 0: the model stays fixed, so one process can replay both ranks' source batches and must reach the
    # same statistics.
    frozen = {**config, "solver": {**config["solver"], "adapt": {"iters": 3, "lr": 1e-30}}}
    f0, _ = torchrun(tmp, frozen, init, "frozen")
    from sdca.engine.builders import Stream, build_dataset
    from sdca.engine.recipe import stage_transform
    from sdca.engine.runner import stream_seed
    from sdca.method import SemanticDistribution, downsample_labels
    from sdca.models import load_model, read_checkpoint

    cfg = load_config(None, [], **frozen)
    model = load_model(str(init))
    model.train()
    stats = {k: SemanticDistribution.from_state_dict(v) for k, v in read_checkpoint(str(init))["statistics"].items()}
    source = build_dataset(cfg.data.source, 19, stage_transform(cfg, "source"))
    streams = [Stream(source, 1, 0, stream_seed(cfg.seed, "adapt", 0), rank, 2) for rank in range(2)]
    with torch.no_grad():
        for _ in range(3):
            batches = [next(s) for s in streams]
            outs = [model(model.info.normalization(b["image"])) for b in batches]
            labels = torch.cat([downsample_labels(b["label"], o.features.shape[-2:]).reshape(-1)
                                for b, o in zip(batches, outs)])
            for level, attr in (("features", "features"), ("outputs", "logits")):
                rows = torch.cat([getattr(o, attr).permute(0, 2, 3, 1).reshape(-1, getattr(o, attr).shape[1])
                                  for o in outs])
                stats[level].update(F.normalize(rows.float(), dim=1), labels)
    for level in ("features", "outputs"):
        assert torch.equal(f0["stats"][level]["count"], stats[level].count)
        torch.testing.assert_close(f0["stats"][level]["mean"], stats[level].mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(f0["stats"][level]["covariance"], stats[level].covariance, rtol=1e-4, atol=1e-7)
