"""AdaBN and per-domain batch-norm statistics against their definitions."""
import pytest
import torch
from torch import nn

from sdca.engine import Runner, load_config
from sdca.engine.batchnorm import recompute_batchnorm, running_stats_untouched
from sdca.models import build_model, load_model


class Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "name": str(i)}


def test_recompute_batchnorm_gives_the_mean_of_batch_statistics():
    torch.manual_seed(0)
    model = build_model("deeplabv2_small", num_classes=19, width=4, bn="train").double().eval()
    images = torch.rand(6, 3, 16, 24, dtype=torch.float64) * torch.linspace(0.2, 1.0, 6)[:, None, None, None]
    first = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # Independent expectation: the first layer's input per batch, captured by a hook, its per-batch mean and
    # unbiased variance averaged with equal weight over the 3 batches (PyTorch's cumulative mode).
    seen = []
    hook = first.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    batches = recompute_batchnorm(model, Images(list(images)), batch_size=2)
    hook.remove()
    assert batches == 3 and len(seen) == 3
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen])
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in seen])
    torch.testing.assert_close(first.running_mean, means.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(first.running_var, variances.mean(0), rtol=1e-10, atol=1e-12)
    assert first.momentum == 0.1 and not model.training  # settings restored


def test_recompute_batchnorm_refuses_a_model_without_running_statistics():
    model = build_model("deeplabv2_small", num_classes=19, width=4, bn="frozen")
    with pytest.raises(ValueError, match="no trainable batch norm"):
        recompute_batchnorm(model, Images([torch.rand(3, 16, 16)]))


def test_running_stats_untouched_normalises_with_batch_statistics_but_keeps_running_ones():
    bn = nn.BatchNorm2d(3).train()
    bn.running_mean.fill_(5.0)
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    with running_stats_untouched(bn):
        y = bn(x)
    assert torch.equal(bn.running_mean, torch.full((3,), 5.0)) and bn.momentum == 0.1
    expected = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False,
                                                                          keepdim=True) + bn.eps)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    bn(x)  # outside, the running statistics move again
    assert not torch.equal(bn.running_mean, torch.full((3,), 5.0))


def test_adapt_bn_target_takes_running_statistics_from_target_batches_only(tiny_data):
    """With adapt_bn=target and no trainable change (lr ~ 0), the adapted model's running mean of the first
    batch norm equals an exponential average over the target batches alone, starting from the source one."""
    tmp, config = tiny_data
    config["model"]["bn"] = "train"
    config["method"] = {"adapt_bn": "target", "lambda_feat": 0.0, "lambda_out": 0.0}
    cfg = load_config(None, [], **config)
    Runner(cfg, progress=False).train(["source", "init-stats"])
    start = load_model(str(tmp / "runs" / "tiny" / "init-stats" / "final.pt"))
    cfg.solver.adapt.lr = 1e-30
    runner = Runner(cfg, progress=False)
    from sdca.engine.recipe import stage_transform

    target = runner._dataset("target", stage_transform(cfg, "adapt", "target"))
    source = runner._dataset("source", stage_transform(cfg, "adapt"), labelled_required=True)
    stream = runner._streams("adapt", {}, cfg.solver.adapt, source=source, target=target)["target"]  # adapt's own
    runner.train(["adapt"])
    adapted = load_model(str(tmp / "runs" / "tiny" / "adapt" / "final.pt"))
    first = lambda m: next(x for x in m.modules() if isinstance(x, nn.BatchNorm2d))  # noqa: E731
    expected = first(start).running_mean.clone()
    captured = []
    h = first(start).register_forward_hook(lambda m, inp, out: captured.append(inp[0].mean(dim=(0, 2, 3))))
    start.train()
    with running_stats_untouched(start), torch.no_grad():
        for _ in range(cfg.solver.adapt.iters):
            start(start.info.normalization(next(stream)["image"]))
    h.remove()
    for mean in captured:
        expected = 0.9 * expected + 0.1 * mean
    torch.testing.assert_close(first(adapted).running_mean, expected, rtol=1e-4, atol=1e-5)
