"""The compiled closed-form loss against the pure-PyTorch reference: values and gradients."""
import pytest
import torch

import sdca
from sdca import ops
from tests.common_utils import DEVICES

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


# (N, A, K): the grid the kernels were specified on, trimmed where the float64 reference itself would take minutes on 2 cores.
# The diagonal shapes also cover each CUDA kernel variant: K <= 8, <= 20 and <= 32 (the tiled kernel's three
# class widths) and K > 32 (one block per row); N and A off the tile sizes (128 rows, 32 columns).
GRID_DIAG = [(1, 19, 2), (1000, 19, 19), (100_000, 19, 19), (100_000, 64, 16), (3000, 64, 2),
             (2000, 2048, 19), (1, 2048, 16), (777, 45, 30), (300, 33, 40)]
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
            lambda x: ops.closed_form_loss(x, labels, mean, cov, 0.7, normalize, IGNORE), (q,))  # noqa: B023


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


@pytest.mark.parametrize("device", DEVICES)
def test_bad_label_is_an_error_and_the_device_survives(device):
    """A label outside [0, K) is a clear error before any kernel runs; on a GPU the context stays usable (a
    device-side assert would poison it for the rest of the process)."""
    q, labels, mean, cov = inputs(300, 40, 5, False, torch.float32, device)
    labels[7] = 5
    for check in (True, False):
        with pytest.raises((RuntimeError, ValueError), match=r"labels.*\[0, 5\)|outside \[0, 5\)"):
            sdca.sdca_loss(q, labels, mean, cov, 0.5, check_labels=check)
    labels[7] = 1
    (loss_e, _), (loss_r, _) = both(q, labels, mean, cov, 0.5, True)
    assert_close(loss_e, loss_r, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_no_gradient_is_computed_under_no_grad(device, monkeypatch):
    """Evaluation (torch.no_grad) must not make the kernel compute and keep an N x A gradient."""
    q, labels, mean, cov = inputs(50, 8, 3, False, torch.float32, device)
    seen = []
    real = torch.ops.sdca.closed_form_loss

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(torch.ops.sdca, "closed_form_loss", spy)
    x = q.clone().requires_grad_(True)
    with torch.no_grad():
        ops.closed_form_loss(x, labels, mean, cov, 0.5, True, IGNORE)
    ops.closed_form_loss(x, labels, mean, cov, 0.5, True, IGNORE)
    assert seen == [False, True]


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_is_refused_not_wrong(device):
    """The op's gradient comes from the kernel, so a second derivative through it would silently be wrong."""
    q, labels, mean, cov = inputs(20, 6, 3, False, torch.float64, device)
    x = q.clone().requires_grad_(True)
    loss = ops.closed_form_loss(x, labels, mean, cov, 0.5, True, IGNORE).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
    # The reference supports it; the first derivative through the op is unaffected.
    with ops.reference_only():
        ref = ops.closed_form_loss(x, labels, mean, cov, 0.5, True, IGNORE).sum()
    (g,) = torch.autograd.grad(ref, x, create_graph=True)
    assert g.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_diag_kernels_agree_on_cuda(monkeypatch):
    """Every CUDA diagonal kernel (the default tiled one, its 256-thread geometry, one block per row) computes the
    same thing; an unknown choice is an error naming the variable."""
    q, labels, mean, cov = inputs(5000, 300, 19, False, torch.float32, "cuda", seed=3)
    default = both(q, labels, mean, cov, 0.5, True)[0]
    for choice in ("tiled256", "rows"):
        monkeypatch.setenv("SDCA_CUDA_DIAG_KERNEL", choice)
        other = both(q, labels, mean, cov, 0.5, True)[0]
        assert_close(default[0], other[0], torch.float32)
        assert_close(default[1], other[1], torch.float32)
    monkeypatch.setenv("SDCA_CUDA_DIAG_KERNEL", "fast")
    with pytest.raises(RuntimeError, match="SDCA_CUDA_DIAG_KERNEL"):
        ops.closed_form_loss(q, labels, mean, cov, 0.5, True, IGNORE)
