"""Backward's in-place scaling of the large gradients (Triton path: compiled on CUDA, else the interpreter,
which rounds float32 to bfloat16 toward zero where the GPU rounds to nearest: one ulp apart)."""

import pytest
import torch

pytestmark = pytest.mark.triton

triton_scale = pytest.importorskip("wmtp_kernels._triton_scale")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", [1.0, 0.37, -2.5, 0.0])
def test_scaling_equals_mul_and_leaves_the_tensor_alone_for_one(dtype, grad):
    x = torch.randn(3 * triton_scale.BLOCK + 5, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
    g = torch.tensor(grad, device=DEVICE)  # float32, as autograd passes the loss's gradient
    got = x.clone()
    triton_scale.launch_scale_unless_one_(got, g)
    ulp = 0 if DEVICE == "cuda" or dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got, x.clone().mul_(g.to(dtype)), rtol=ulp, atol=0)
    if grad == 1.0:
        assert torch.equal(got, x)


def test_non_contiguous_tensors_take_mul():
    x = torch.randn(6, 4, device=DEVICE)
    got = triton_scale.scale_unless_one_(x.clone().t(), torch.tensor(3.0, device=DEVICE))
    torch.testing.assert_close(got, x.t() * 3, rtol=0, atol=0)
