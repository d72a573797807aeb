"""The compiled class-moment kernel against the reference, and the estimator built on it."""
import pytest
import torch

from sdca import SemanticDistribution, ops
from tests.common_utils import DEVICES

IGNORE = 255


def batch(N, A, K, dtype, device, seed, absent=()):
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([k for k in range(K) if k not in absent])
    labels = allowed[torch.randint(len(allowed), (N,), generator=gen)]
    labels[torch.rand(N, generator=gen) < 0.2] = IGNORE
    offsets = torch.randn(K, A, generator=gen, dtype=torch.float64) * 4
    feats = torch.randn(N, A, generator=gen, dtype=torch.float64) + offsets[labels.clamp(max=K - 1)]
    return feats.to(dtype).to(device), labels.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["f32", "f64", "f16"])
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
@pytest.mark.parametrize("shape", [(1, 19, 2), (5000, 64, 19), (2000, 2048, 16), (100_000, 19, 19)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, dtype, full, shape):
    N, A, K = shape
    if full and A == 2048 and dtype == torch.float64 and device == "cpu":
        N = 600  # the float64 reference Gram matrices are the slow part here
    feats, labels = batch(N, A, K, dtype, device, seed=N + A, absent=(0,) if K > 2 else ())
    count, mean, cov = ops.class_moments(feats, labels, K, full, IGNORE, torch.float64)
    count_r, mean_r, cov_r = ops.reference.class_moments(feats, labels, K, full, IGNORE, torch.float64)
    assert torch.equal(count.cpu(), count_r.cpu())
    torch.testing.assert_close(mean, mean_r, rtol=1e-12, atol=1e-12)  # float64 sums either way
    # A full covariance stays at the features' accumulation precision; the rest is float64.
    expected_dtype = (torch.float64 if dtype == torch.float64 else torch.float32) if full else torch.float64
    assert cov.dtype == expected_dtype
    rtol = 1e-10 if dtype == torch.float64 or not full else 1e-4
    torch.testing.assert_close(cov.double(), cov_r, rtol=rtol, atol=rtol * float(cov_r.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_estimator_on_extension_equals_reference_after_random_sequence(device, full):
    K, A = 7, 24
    ext, ref = SemanticDistribution(K, A, "full" if full else "diag"), SemanticDistribution(K, A, "full" if full else "diag")
    for step, n in enumerate([300, 1, 17, 900, 2, 64]):
        feats, labels = batch(n, A, K, torch.float64, device, seed=step, absent=(3,))
        ext.to(device).update(feats, labels)
        with ops.reference_only():
            ref.to(device).update(feats, labels)
    assert torch.equal(ext.count, ref.count)
    torch.testing.assert_close(ext.mean, ref.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ext.covariance, ref.covariance, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float32], ids=["state64", "state32"])
@pytest.mark.parametrize("feat_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_fused_update_matches_reference(device, state_dtype, feat_dtype, full):
    """update_statistics (moments + Eq. 3-4 merge in place) against the reference, over a batch sequence."""
    K, A = 6, 40 if full else 300
    states = []
    for use_ext in (True, False):
        count = torch.zeros(K, dtype=torch.int64, device=device)
        mean = torch.zeros(K, A, dtype=state_dtype, device=device)
        cov = torch.zeros((K, A, A) if full else (K, A), dtype=state_dtype, device=device)
        for step, n in enumerate([500, 1, 3, 2000, 40]):
            feats, labels = batch(n, A, K, feat_dtype, device, seed=step, absent=(2,))
            fn = ops.update_statistics if use_ext else ops.reference.update_statistics
            fn(count, mean, cov, feats, labels, IGNORE)
        states.append((count, mean, cov))
    (c1, m1, s1), (c2, m2, s2) = states
    assert torch.equal(c1, c2) and c1[2] == 0
    assert torch.all(m1[2] == 0) and torch.all(s1[2] == 0)  # a class never seen stays zero
    rtol = 1e-10 if state_dtype == torch.float64 and (feat_dtype == torch.float64 or not full) else 1e-4
    torch.testing.assert_close(m1, m2, rtol=rtol, atol=rtol * float(m2.abs().max()))
    torch.testing.assert_close(s1, s2, rtol=rtol, atol=rtol * float(s2.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_update_rejects_bad_state(device):
    feats, labels = batch(20, 5, 3, torch.float32, device, seed=0)
    count = torch.zeros(3, dtype=torch.int64, device=device)
    mean = torch.zeros(3, 5, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match="covariance and mean must share a dtype"):
        torch.ops.sdca.update_statistics(count, mean, torch.zeros(3, 5, device=device), feats, labels, IGNORE)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.sdca.update_statistics(count, mean, torch.zeros(3, 5, 5, dtype=torch.float64,
                                                                  device=device).transpose(1, 2), feats, labels,
                                         IGNORE)
    with pytest.raises(RuntimeError, match="dimension"):
        torch.ops.sdca.update_statistics(count, mean, torch.zeros(3, 5, dtype=torch.float64, device=device),
                                         feats[:, :4], labels, IGNORE)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_bad_labels(device):
    feats, labels = batch(50, 6, 4, torch.float32, device, seed=1)
    for full in (True, False):
        torch.library.opcheck(torch.ops.sdca.class_moments.default, (feats, labels, 4, full, IGNORE),
                              test_utils=("test_schema", "test_faketensor"))
        state = (torch.zeros(4, dtype=torch.int64, device=device), torch.zeros(4, 6, dtype=torch.float64, device=device),
                 torch.zeros((4, 6, 6) if full else (4, 6), dtype=torch.float64, device=device))
        torch.library.opcheck(torch.ops.sdca.update_statistics.default, (*state, feats, labels, IGNORE),
                              test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match=r"outside \[0, 4\)|must lie in \[0, 4\)"):
        torch.ops.sdca.class_moments(feats, torch.full_like(labels, 9), 4, True, IGNORE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_zero_width_features_and_many_classes(device, full):
    """Launch edges: A = 0 with rows present, and more classes than one shared-memory window holds."""
    feats, labels = batch(40, 0, 3, torch.float32, device, seed=2)
    count, mean, cov = ops.class_moments(feats, labels, 3, full, IGNORE)
    count_r, _, _ = ops.reference.class_moments(feats, labels, 3, full, IGNORE)
    assert torch.equal(count.cpu(), count_r.cpu()) and mean.shape == (3, 0)
    feats, labels = batch(3000, 7, 130, torch.float64, device, seed=3)
    count, mean, cov = ops.class_moments(feats, labels, 130, full, IGNORE, torch.float64)
    count_r, mean_r, cov_r = ops.reference.class_moments(feats, labels, 130, full, IGNORE, torch.float64)
    assert torch.equal(count.cpu(), count_r.cpu())
    torch.testing.assert_close(mean, mean_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov.double(), cov_r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_ignore_index_inside_the_class_range(device):
    """ignore_index wins over a class id: with ignore_index = 1 class 1 gets nothing."""
    feats, labels = batch(500, 9, 4, torch.float64, device, seed=4)
    labels[labels == IGNORE] = 2
    for full in (True, False):
        got = ops.class_moments(feats, labels, 4, full, 1, torch.float64)
        want = ops.reference.class_moments(feats, labels, 4, full, 1, torch.float64)
        assert int(got[0][1]) == 0
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_cuda_moments_are_deterministic(full, monkeypatch):
    """Fixed reduction order: the same bits on every run, and no complaint under deterministic mode."""
    feats, labels = batch(200_000, 256, 19, torch.float32, "cuda", seed=5)
    previous = torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic mode asks of cuBLAS users
    torch.use_deterministic_algorithms(True)
    try:
        first = ops.class_moments(feats, labels, 19, full, IGNORE)
        second = ops.class_moments(feats, labels, 19, full, IGNORE)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_update_makes_no_class_by_dim_by_dim_temporary():
    """update_statistics merges class by class: its peak extra memory stays far below one K x A x A tensor."""
    K, A = 19, 1024
    feats, labels = batch(20_000, A, K, torch.float32, "cuda", seed=6)
    count = torch.zeros(K, dtype=torch.int64, device="cuda")
    mean = torch.zeros(K, A, device="cuda")
    cov = torch.zeros(K, A, A, device="cuda")
    ops.update_statistics(count, mean, cov, feats, labels, IGNORE)  # warm-up: cuBLAS workspace, kernels
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ops.update_statistics(count, mean, cov, feats, labels, IGNORE)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # A batch covariance of the state's shape alone would be K x A x A x 4 bytes.
    assert extra < K * A * A * 4 / 2, f"{extra / 2**20:.1f} MiB extra for a {K * A * A * 4 / 2**20:.0f} MiB state"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_moments_past_the_grid_row_limit():
    """More rows than 65,535 x 1,024 (the old kernel's gridDim.y bound), against a float64 bincount reference."""
    N, K = 65_535 * 1_024 + 4_097, 3
    gen = torch.Generator(device="cuda").manual_seed(7)
    labels = torch.randint(K, (N,), device="cuda", generator=gen)
    feats = (labels.to(torch.float32) * 2 + 1).unsqueeze(1)
    count, mean, var = ops.class_moments(feats, labels, K, False, IGNORE)
    expected = torch.bincount(labels, minlength=K)
    assert torch.equal(count, expected)
    torch.testing.assert_close(mean[:, 0], torch.arange(K, device="cuda", dtype=torch.float64) * 2 + 1)
    assert float(var.abs().max()) < 1e-20  # each class is one value: nothing but rounding of its mean
