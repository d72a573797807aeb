"""The compiled closed-form loss against the pure-PyTorch reference: values and gradients."""
import pytest
import torch
import torch.nn.functional as F

import sdca
from sdca import ops

from .conftest import DEVICES

IGNORE = 255
RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def assert_close(actual, expected, dtype):
    """rtol per dtype; the absolute floor is rtol x the largest |expected|, since gradient entries near 0 come
    from cancelling terms of the tensor's own scale and both backends round them differently."""
    rtol = RTOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def inputs(N, A, K, full, dtype, device, seed=0, ignore_share=0.2, absent=(), scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(N, A, generator=gen, dtype=torch.float64) * scale
    allowed = torch.tensor([k for k in range(K) if k not in absent])
    labels = allowed[torch.randint(len(allowed), (N,), generator=gen)]
    labels[torch.rand(N, generator=gen) < ignore_share] = IGNORE
    mean = torch.randn(K, A, generator=gen, dtype=torch.float64) / A ** 0.5
    if full:
        root = torch.randn(K, A, min(A, 8), generator=gen, dtype=torch.float64) / A ** 0.5
        cov = root @ root.transpose(1, 2)  # symmetric PSD of low rank: cheap to build at A = 2048
    else:
        cov = torch.rand(K, A, generator=gen, dtype=torch.float64) / A
    for k in absent:  # a class never seen has zero statistics
        mean[k] = 0
        cov[k] = 0
    return tuple(t.to(device) for t in (q.to(dtype), labels, mean.to(dtype), cov.to(dtype)))


def both(q, labels, mean, cov, tau, normalize):
    """(loss, grad) from the extension op and from the reference, each with its own autograd."""
    results = []
    for use_ext in (True, False):
        x = q.detach().clone().requires_grad_(True)
        if use_ext:
            per_pixel = ops.closed_form_loss(x, labels, mean, cov, tau, normalize, IGNORE)
        else:
            per_pixel = ops.reference.closed_form_loss(x, labels, mean, cov, tau, normalize, IGNORE)
        weights = torch.linspace(0.5, 1.5, x.shape[0], dtype=per_pixel.dtype, device=x.device)
        (per_pixel * weights).sum().backward()  # non-uniform upstream gradient exercises the row scaling
        results.append((per_pixel.detach(), x.grad))
    return results


# (N, A, K): the grid, trimmed where the float64 reference itself would take minutes on 2 cores.
GRID_DIAG = [(1, 19, 2), (1000, 19, 19), (100_000, 19, 19), (100_000, 64, 16), (3000, 64, 2),
             (2000, 2048, 19), (1, 2048, 16)]
GRID_FULL = [(1, 19, 2), (1000, 19, 19), (100_000, 19, 19), (20_000, 64, 16), (3000, 64, 2),
             (300, 2048, 2), (40, 2048, 19)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("full,shape", [(False, s) for s in GRID_DIAG] + [(True, s) for s in GRID_FULL],
                         ids=[f"diag-{n}x{a}x{k}" for n, a, k in GRID_DIAG] + [f"full-{n}x{a}x{k}" for n, a, k in GRID_FULL])
def test_matches_reference(device, dtype, normalize, full, shape):
    N, A, K = shape
    q, labels, mean, cov = inputs(N, A, K, full, dtype, device, seed=N + A + K, absent=(1,) if K > 2 else ())
    (loss_e, grad_e), (loss_r, grad_r) = both(q, labels, mean, cov, 0.5, normalize)
    assert loss_e.dtype == dtype and grad_e.dtype == dtype
    assert_close(loss_e, loss_r, dtype)
    assert_close(grad_e, grad_r, dtype)
    assert torch.all(loss_e[labels == IGNORE] == 0) and torch.all(grad_e[labels == IGNORE] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_gradcheck(device, full, normalize):
    for seed in range(3):
        q, labels, mean, cov = inputs(12, 5, 3, full, torch.float64, device, seed=seed)
        q.requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda x: ops.closed_form_loss(x, labels, mean, cov, 0.7, normalize, IGNORE), (q,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_opcheck(device, full):
    q, labels, mean, cov = inputs(20, 6, 4, full, torch.float32, device)
    q.requires_grad_(True)
    torch.library.opcheck(torch.ops.sdca.closed_form_loss.default, (q, labels, mean, cov, 0.5, True, IGNORE, True))
    torch.library.opcheck(torch.ops.sdca.closed_form_loss.default,
                          (q.detach(), labels, mean, cov, 0.5, False, IGNORE, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_low_precision_inputs_accumulate_in_float32(device, half, full):
    q, labels, mean, cov = inputs(500, 64, 19, full, torch.float32, device)
    qh = q.to(half)
    (loss_e, grad_e), (loss_r, grad_r) = both(qh, labels, mean, cov, 0.5, True)
    assert loss_e.dtype == torch.float32 and grad_e.dtype == half
    torch.testing.assert_close(loss_e, loss_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_e.float(), grad_r.float(), rtol=1e-2, atol=1e-3)  # grads are stored in half


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_sdca_loss_same_on_both_backends(device, variant, full):
    if variant == "reference" and full:
        full = False  # the public variant is defined for diagonal variances only
    q, labels, mean, cov = inputs(3000, 64, 19, full, torch.float64, device, scale=3.0)
    values = []
    for ctx in (torch.enable_grad, ops.reference_only):
        x = q.clone().requires_grad_(True)
        with ctx():
            loss = sdca.sdca_loss(x, labels, mean * 10, cov, 0.3, variant=variant)
        loss.backward()
        values.append((loss.detach(), x.grad))
    assert_close(values[0][0], values[1][0], torch.float64)
    assert_close(values[0][1], values[1][1], torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_norm_rows_and_no_labelled_pixel(device):
    q, labels, mean, cov = inputs(10, 7, 3, False, torch.float64, device)
    q[:3] = 0  # F.normalize divides these by eps
    (loss_e, grad_e), (loss_r, grad_r) = both(q, labels, mean, cov, 0.5, True)
    assert_close(loss_e, loss_r, torch.float64)
    assert_close(grad_e, grad_r, torch.float64)
    none = torch.full_like(labels, IGNORE)
    (loss_e, grad_e), _ = both(q, none, mean, cov, 0.5, True)
    assert torch.all(loss_e == 0) and torch.all(grad_e == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_op_rejects_bad_input(device):
    q, labels, mean, cov = inputs(10, 7, 3, True, torch.float32, device)
    op = torch.ops.sdca.closed_form_loss
    with pytest.raises(RuntimeError, match="labels must lie in"):
        op(q, torch.full_like(labels, 3), mean, cov, 0.5, False, IGNORE, False)
    with pytest.raises(RuntimeError, match="covariance must be"):
        op(q, labels, mean, cov[:, :3], 0.5, False, IGNORE, False)
    with pytest.raises(RuntimeError, match="tau must be positive"):
        op(q, labels, mean, cov, 0.0, False, IGNORE, False)
    with pytest.raises(RuntimeError, match="labels must be an integer"):
        op(q, labels.float(), mean, cov, 0.5, False, IGNORE, False)
