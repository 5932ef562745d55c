"""The implementations compared by the loss benchmark, each a forward + backward of the weighted MTP loss.

Every implementation gets the same inputs: ``hidden [B, T, H, d]`` and ``W [V, d]`` requiring grad,
labels, and per-token weights. The peers are given the row targets and per-row factors
``weight * scale`` precomputed (outside the timed region), which favours them slightly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wmtp_kernels import fused_weighted_mtp_loss
from wmtp_kernels._rows import build_row_layout, gather_row_weights, row_scale
from wmtp_kernels.reference import IGNORE_INDEX

CPU_SHAPES = [(4, 256, 4, 512, 32000), (1, 256, 4, 512, 128256)]
CUDA_SHAPES = [(4, 2048, 4, 4096, 32000), (2, 2048, 4, 4096, 128256)]
IMPLS = ["floor", "naive", "compile", "cce", "liger", "ours"]


def make_case(shape, dtype, device, seed=0):
    """Inputs of one benchmark case (hidden / W require grad) plus precomputed row data for the peers."""
    batch, seq, heads, dim, vocab = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(batch, seq, heads, dim, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * dim**-0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    weights = (torch.rand(batch, seq, generator=g) * 2 + 0.1).to(device)
    layout = build_row_layout(labels, None, heads, IGNORE_INDEX)
    rows = torch.arange(layout.n_rows, device=device)
    coef = row_scale(layout, "mean") * gather_row_weights(layout, weights, rows)
    targets = torch.where(layout.valid, layout.targets, IGNORE_INDEX)
    return {
        "hidden": hidden,
        "weight": weight,
        "labels": labels,
        "weights": weights,
        "targets": targets,
        "coef": coef,
    }


def naive_loss(hidden, weight, targets, coef):
    """Materialised logits, per-row cross-entropy, weighted sum (what a plain PyTorch trainer writes)."""
    logits = F.linear(hidden, weight).flatten(0, 2).float()
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * coef).sum()


_compiled = torch.compile(naive_loss)


def step(impl, case, chunk_size=None):
    """One forward + backward of ``impl`` (grads of hidden and W accumulate into ``.grad``)."""
    hidden, weight = case["hidden"], case["weight"]
    if impl == "floor":
        with torch.no_grad():
            x = hidden.flatten(0, 2)
            g = x @ weight.t()
            _ = g @ weight
            _ = g.t() @ x
        return
    if impl == "ours":
        loss = fused_weighted_mtp_loss(
            hidden, weight, case["labels"], weights=case["weights"], chunk_size=chunk_size
        )
    elif impl == "naive":
        loss = naive_loss(hidden, weight, case["targets"], case["coef"])
    elif impl == "compile":
        loss = _compiled(hidden, weight, case["targets"], case["coef"])
    elif impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        kind = "cce" if hidden.is_cuda else "torch_compile"
        ce = linear_cross_entropy(hidden.flatten(0, 2), weight, case["targets"], impl=kind, reduction="none")
        loss = (ce.float() * case["coef"]).sum()
    elif impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden.flatten(0, 2), case["targets"])
        loss = (ce.float() * case["coef"]).sum()
    else:
        raise ValueError(f"unknown impl {impl!r}")
    loss.backward()


def available(impl, device):
    """Whether ``impl`` can run here (peers are optional), and why not."""
    if impl == "cce":
        try:
            import cut_cross_entropy  # noqa: F401
        except ImportError:
            return False, "cut-cross-entropy not installed"
    if impl == "liger":
        if device != "cuda":
            return False, "Liger-Kernel needs CUDA"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return False, "liger-kernel not installed"
    return True, ""
