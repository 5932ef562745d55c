"""Scaling a stored gradient by the incoming gradient in place, skipped on the device when it is 1.

The fused loss computes its gradients in the forward pass for an incoming gradient of 1 and scales them
in backward. Usually it is exactly 1 (``loss.backward()``), where the multiply is an identity that still
reads and writes every element (on an H100, 0.8 ms of a step at V = 32000 and 1.7 ms at V = 128256,
benchmarks/KERNEL_NOTES.md). Reading the value on the host would synchronise; here every program of
the kernel reads it and returns without touching memory when it is 1. Otherwise the result is the one
of ``x.mul_(grad.to(x.dtype))``: the product in float32, rounded once to the tensor's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 8192


@triton.jit
def _scale_unless_one_kernel(x_ptr, grad_ptr, n, BLOCK: tl.constexpr):
    g = tl.load(grad_ptr).to(x_ptr.dtype.element_ty).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + offs, mask=inside)
        product = (x.to(tl.float32) * g).to(x_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(x_ptr + offs, product, mask=inside)


def scale_unless_one_(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``x *= grad`` in place (``grad`` a one-element tensor on ``x``'s device): the kernel for contiguous
    CUDA tensors, ``mul_`` otherwise (the interpreter rounds to bfloat16 toward zero, not to nearest).

    Returns:
        ``x``.
    """
    if not (x.is_cuda and x.is_contiguous()) or x.numel() == 0:
        return x.mul_(grad.to(x.dtype))
    launch_scale_unless_one_(x, grad)
    return x


def launch_scale_unless_one_(x: torch.Tensor, grad: torch.Tensor) -> None:
    """Launch the kernel on a contiguous, non-empty ``x``."""
    _scale_unless_one_kernel[(triton.cdiv(x.numel(), BLOCK),)](
        x, grad.reshape(1), x.numel(), BLOCK=BLOCK, num_warps=8
    )
