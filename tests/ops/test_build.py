"""What the build registered: a CUDA build must bring CUDA kernels, or the CUDA tests compare the reference with
itself."""
import pytest
import torch

from sdca import ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_build_registers_cuda_kernels():
    assert "cuda" in ops.backends()["devices"], "the extension was built without its CUDA kernels"
    for name in ("closed_form_loss", "class_moments", "update_statistics"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sdca::{name}", "CUDA"), name


def test_cpu_kernels_registered():
    for name in ("closed_form_loss", "class_moments", "update_statistics"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sdca::{name}", "CPU"), name
