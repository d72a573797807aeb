"""Is each loss term doing anything? The adaptation step's per-term gradient norms against independent
computations, and its cheap target signals in metrics.jsonl."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from sdca.engine import Runner, load_config
from sdca.engine.config import MethodConfig
from sdca.engine.distributed import DistInfo
from sdca.engine.steps import AdaptStep
from sdca.method import SemanticDistribution
from sdca.models import build_model, upsample_logits


class Same:
    def __init__(self, batch):
        self.batch = batch

    def __next__(self):
        return {k: v.clone() for k, v in self.batch.items()}


def setup(lambda_feat):
    torch.manual_seed(0)
    model = build_model("deeplabv2_small", 19, width=8).train()  # frozen batch norm: forwards are repeatable
    gen = torch.Generator().manual_seed(1)
    src = {"image": torch.rand(2, 3, 32, 64, generator=gen), "label": torch.randint(19, (2, 32, 64), generator=gen)}
    tgt = {"image": torch.rand(2, 3, 32, 64, generator=gen)}
    stats = {}
    for name, dim in (("features", model.feature_dim), ("outputs", 19)):
        s = SemanticDistribution(19, dim, "diag")
        rows = F.normalize(torch.randn(2000, dim, generator=gen), dim=1)
        s.update(rows, torch.arange(2000) % 19)
        stats[name] = s
    method = MethodConfig(covariance="diag", tau=0.5, delta=0.0, lambda_feat=lambda_feat, lambda_out=0.5)
    step = AdaptStep(model, torch.optim.SGD(model.parameters(), lr=0.0), Same(src), Same(tgt), stats["features"],
                     stats["outputs"], method, torch.device("cpu"), None, DistInfo(), diagnostics_period=1)
    return model, src, step


def test_ce_gradient_norm_equals_an_ordinary_backward():
    model, src, step = setup(lambda_feat=1.0)
    ref = copy.deepcopy(model)
    out = ref(ref.info.normalization(src["image"]))
    out.features.retain_grad()
    ce = F.cross_entropy(upsample_logits(out.logits.float(), src["label"].shape[-2:]), src["label"], ignore_index=255)
    ce.backward()
    expected = float(out.features.grad.norm())  # the target features do not reach CE: their part is zero
    got = step.run_step(0)
    assert got["gradnorm_ce"] == pytest.approx(expected, rel=1e-5)
    assert got["gradshare_feat"] == pytest.approx(got["gradnorm_feat"] / got["gradnorm_ce"], rel=1e-12)


def test_the_feature_term_scales_with_its_weight_and_vanishes_at_zero():
    norms = {lam: setup(lambda_feat=lam)[2].run_step(0)["gradnorm_feat"] for lam in (0.0, 1.0, 2.0)}
    assert norms[0.0] == 0.0 and norms[1.0] > 0
    assert norms[2.0] == pytest.approx(2 * norms[1.0], rel=1e-5)  # d(lambda L)/dx = lambda dL/dx


def test_adaptation_logs_the_diagnostics_every_log_period(tiny_data):
    tmp, config = tiny_data
    config["solver"]["log_period"] = 1
    cfg = load_config(None, [], **config)
    Runner(cfg, progress=False).train(["source", "init-stats", "adapt"])
    records = [json.loads(line) for line in (tmp / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    adapt = [r for r in records if r.get("stage") == "adapt" and "step" in r and "loss_ce" in r]
    assert len(adapt) == cfg.solver.adapt.iters
    for r in adapt:
        assert {"gradnorm_ce", "gradnorm_feat", "gradnorm_out", "gradshare_feat", "prediction_drift"} <= set(r)
        assert 0.0 <= r["prediction_drift"] <= 1.0
        assert all(0.0 <= v <= 1.0 for k, v in r.items() if k.startswith("confident_"))
    assert adapt[0]["prediction_drift"] == 0.0  # measured against the stage's first prediction shares


def test_mask_precision_against_a_brute_force_when_target_labels_are_given():
    """Target labels (for monitoring) give the precision of the Eq. 5 mask: counted here pixel by pixel."""
    import numpy as np

    from sdca.method import downsample_labels, target_mask

    model, src, step = setup(lambda_feat=0.1)
    gen = torch.Generator().manual_seed(5)
    truth = torch.randint(19, (2, 32, 64), generator=gen)
    truth[:, :4] = 255
    step.target = Same({"image": step.target.batch["image"], "label": truth})
    ref = copy.deepcopy(model)
    with torch.no_grad():
        t_logits = ref(ref.info.normalization(step.target.batch["image"])).logits
    got = step.run_step(0)
    mask = target_mask(t_logits.float(), 0.0).reshape(-1).numpy()
    small = downsample_labels(truth, t_logits.shape[-2:]).reshape(-1).numpy()
    kept = (mask != 255) & (small != 255)
    assert got["mask_precision"] == pytest.approx((mask[kept] == small[kept]).mean(), rel=1e-12)
    for c in np.unique(mask[kept]):
        sel = kept & (mask == c)
        assert got[f"mask_precision_{c}"] == pytest.approx((small[sel] == c).mean(), rel=1e-12)
