"""Comparison against a float64 ground truth, CCE style: no worse than the same-dtype reference.

``assert_no_worse(name, actual, same_dtype_reference, truth)`` passes when the largest absolute error
of ``actual`` against ``truth`` is at most the reference's largest error plus a small tolerance
(relative to the largest magnitude of ``truth``), and prints the worst elements when it fails.
"""

import torch

# Tolerance added to the reference's error, as a fraction of max |truth|.
SLACK = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def worst_mismatches(actual: torch.Tensor, truth: torch.Tensor, count: int = 5) -> str:
    err = (actual.double() - truth).abs().flatten()
    top = err.topk(min(count, err.numel())).indices
    lines = []
    for i in top.tolist():
        index = tuple(torch.unravel_index(torch.tensor(i), truth.shape)) if truth.dim() else ()
        index = tuple(int(x) for x in index)
        lines.append(
            f"  at {index}: got {actual.flatten()[i].item():.8g}, truth {truth.flatten()[i].item():.8g}, "
            f"err {err[i].item():.3g}"
        )
    return "\n".join(lines)


def assert_no_worse(
    name: str,
    actual: torch.Tensor,
    reference: torch.Tensor,
    truth: torch.Tensor,
    dtype: torch.dtype | None = None,
    slack: float | None = None,
) -> None:
    """Max |actual - truth| <= max |reference - truth| + slack * max |truth|."""
    assert actual.shape == truth.shape, f"{name}: shape {list(actual.shape)} != {list(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values\n{worst_mismatches(actual, truth)}"
    dtype = dtype or reference.dtype
    slack = SLACK[dtype] if slack is None else slack
    ours = (actual.double() - truth).abs().max().item() if truth.numel() else 0.0
    theirs = (reference.double() - truth).abs().max().item() if truth.numel() else 0.0
    scale = truth.abs().max().item() if truth.numel() else 0.0
    bound = theirs + slack * max(scale, 1e-30)
    assert ours <= bound, (
        f"{name}: max error {ours:.3g} > reference's {theirs:.3g} + {slack:g} * {scale:.3g}; worst:\n"
        + worst_mismatches(actual, truth)
    )
