"""SemanticDistribution against float64 batch statistics of every pixel seen."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdca import SemanticDistribution, estimate_semantic_distribution
from sdca.models import load_torch_file

IGNORE = 255


def random_batches(gen, num_classes, dim, sizes, ignore_share=0.2, absent=()):
    """Batches with ignore pixels and some classes never drawn; class-specific offsets make stats distinct."""
    offsets = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64) * 3
    allowed = torch.tensor([k for k in range(num_classes) if k not in absent])
    for n in sizes:
        labels = allowed[torch.randint(len(allowed), (n,), generator=gen)]
        labels[torch.rand(n, generator=gen) < ignore_share] = IGNORE
        scale = torch.rand(dim, generator=gen, dtype=torch.float64) + 0.5
        feats = torch.randn(n, dim, generator=gen, dtype=torch.float64) * scale
        feats += offsets[labels.clamp(max=num_classes - 1)]
        yield feats, labels


def expected_stats(feats, labels, num_classes, full):
    """Plain float64 mean and biased covariance per class, straight from the definitions."""
    dim = feats.shape[1]
    count = torch.zeros(num_classes, dtype=torch.int64)
    mean = torch.zeros(num_classes, dim, dtype=torch.float64)
    cov = torch.zeros((num_classes, dim, dim) if full else (num_classes, dim), dtype=torch.float64)
    for k in range(num_classes):
        x = feats[labels == k].double()
        count[k] = x.shape[0]
        if x.shape[0] == 0:
            continue
        mean[k] = x.mean(0)
        centred = x - mean[k]
        if full:
            cov[k] = centred.t() @ centred / x.shape[0]
        else:
            cov[k] = (centred ** 2).mean(0)
    return count, mean, cov


# float32 features: means and diagonal variances are still accumulated in float64; a full covariance is the
# Gram matrix of centred rows at float32, hence the looser bound there.
TOLERANCE = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-5, 1e-6)}


@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize("sizes", [[40, 1, 7, 100, 1, 1, 33], [1] * 12, [500]])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_running_statistics_equal_pooled_batch_statistics(gen, covariance, sizes, dtype):
    K, A = 5, 6
    est = SemanticDistribution(K, A, covariance)
    seen_f, seen_l = [], []
    for feats, labels in random_batches(gen, K, A, sizes, absent=(3,)):
        est.update(feats.to(dtype), labels)
        seen_f.append(feats.to(dtype).double())  # the values the estimator actually saw
        seen_l.append(labels)
    count, mean, cov = expected_stats(torch.cat(seen_f), torch.cat(seen_l), K, covariance == "full")
    assert torch.equal(est.count, count)
    torch.testing.assert_close(est.mean, mean, rtol=1e-10, atol=1e-10)
    rtol, atol = TOLERANCE[dtype] if covariance == "full" else TOLERANCE[torch.float64]
    torch.testing.assert_close(est.covariance, cov, rtol=rtol, atol=atol)
    assert est.count[3] == 0 and torch.all(est.mean[3] == 0)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_absent_class_untouched(gen, covariance):
    est = SemanticDistribution(3, 4, covariance)
    f1 = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    l1 = torch.tensor([0, 1, 2, 0] * 5)
    est.update(f1, l1)
    before = est.state_dict()
    est.update(torch.randn(10, 4, generator=gen, dtype=torch.float64), torch.tensor([0, 1] * 5))
    assert torch.equal(est.mean[2], before["mean"][2])
    assert torch.equal(est.covariance[2], before["covariance"][2])
    assert est.count[2] == before["count"][2]
    # A batch of only ignored pixels changes nothing at all.
    snap = est.state_dict()
    est.update(torch.randn(4, 4, dtype=torch.float64), torch.full((4,), IGNORE))
    for key in ("count", "mean", "covariance"):
        assert torch.equal(est.state_dict()[key], snap[key])


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_merge_equals_single_stream(gen, covariance):
    K, A = 4, 5
    batches = list(random_batches(gen, K, A, [30, 1, 17, 60, 3, 9]))
    a, b, single = (SemanticDistribution(K, A, covariance) for _ in range(3))
    for i, (f, l) in enumerate(batches):
        (a if i % 2 else b).update(f, l)
        single.update(f, l)
    a.merge(b)
    assert torch.equal(a.count, single.count)
    torch.testing.assert_close(a.mean, single.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.covariance, single.covariance, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_and_shape_errors(gen):
    est = SemanticDistribution(3, 4, "full")
    for f, l in random_batches(gen, 3, 4, [50]):
        est.update(f, l)
    again = SemanticDistribution.from_state_dict(est.state_dict())
    assert torch.equal(again.mean, est.mean) and torch.equal(again.covariance, est.covariance)
    with pytest.raises(ValueError, match="covariance"):
        SemanticDistribution(3, 4, "diag").load_state_dict(est.state_dict())
    with pytest.raises(ValueError, match="mean"):
        SemanticDistribution(3, 5, "full").load_state_dict(est.state_dict())


def test_public_estimator_import():
    state = {"Mean": torch.randn(19, 8), "CoVariance": torch.rand(19, 8), "Amount": torch.arange(19.0) * 1000}
    est = SemanticDistribution.from_public(state)
    assert est.covariance_type == "diag" and est.num_classes == 19 and est.dim == 8
    assert est.count.tolist() == [i * 1000 for i in range(19)]
    torch.testing.assert_close(est.mean, state["Mean"].double())


def test_bad_input_names_argument():
    est = SemanticDistribution(3, 4, "diag")
    with pytest.raises(ValueError, match="features"):
        est.update(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        est.update(torch.randn(5, 4), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        est.update(torch.randn(5, 4), torch.zeros(5))
    with pytest.raises(ValueError, match="labels contains 3"):
        est.update(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels contains -1"):
        est.update(torch.randn(2, 4), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="covariance"):
        SemanticDistribution(3, 4, "spherical")
    # The range check can be switched off for speed.
    SemanticDistribution(3, 4, "diag", check_labels=False).update(torch.randn(2, 4), torch.tensor([0, 1]))


def test_streaming_initialisation_from_feature_maps(gen):
    """Maps at stride 2 with full-size labels: nearest-downsampled labels, same result as rows."""
    K, A = 3, 4
    batches = []
    for _ in range(3):
        feats = torch.randn(2, A, 3, 5, generator=gen, dtype=torch.float64)
        labels = torch.randint(K, (2, 6, 10), generator=gen)
        labels[0, :2] = IGNORE
        batches.append((feats, labels))
    est = estimate_semantic_distribution(iter(batches), K, A, "full")
    rows = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, A) for f, _ in batches])
    labs = torch.cat([l[:, ::2, ::2].reshape(-1) for _, l in batches])  # top-left pixel of each 2x2 block
    count, mean, cov = expected_stats(rows, labs, K, True)
    assert torch.equal(est.count, count)
    torch.testing.assert_close(est.covariance, cov, rtol=1e-10, atol=1e-12)


def _ddp_worker(rank, world, init_file, batches, covariance, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        K, A = 4, 3
        est = SemanticDistribution(K, A, covariance)
        feats, labels = batches[rank]
        est.update(feats, labels)
        est.all_reduce()
        # sync=True pools a second step's batch statistics before the merge.
        est.update(feats * 2 + 1, labels, sync=True)
        torch.save(est.state_dict(), f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_all_reduce_two_processes_equals_single_process(gen, covariance):
    K, A = 4, 3
    batches = list(random_batches(gen, K, A, [37, 21], absent=(2,)))
    # Rank 1 also sees class 2, rank 0 does not: pooling must handle a class only one rank has.
    batches[1][1][:3] = 2
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "state")
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), batches, covariance, out), nprocs=2, join=True)
        states = [load_torch_file(f"{out}.{r}") for r in range(2)]
    single = SemanticDistribution(K, A, covariance)
    single.update(torch.cat([f for f, _ in batches]), torch.cat([l for _, l in batches]))
    single.update(torch.cat([f * 2 + 1 for f, _ in batches]), torch.cat([l for _, l in batches]))
    for state in states:
        assert torch.equal(state["count"], single.count)
        torch.testing.assert_close(state["mean"], single.mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["covariance"], single.covariance, rtol=1e-10, atol=1e-12)
    assert torch.equal(states[0]["mean"], states[1]["mean"])
    assert torch.equal(states[0]["covariance"], states[1]["covariance"])
