"""The implementations compared by the loss benchmarks, each a forward + backward of the weighted MTP loss.

Every implementation gets the same inputs: ``hidden [B, T, H, d]`` and ``W [V, d]`` requiring grad,
``labels [B, T]`` and per-token weights (or, for ``ours-td``, critic values and rewards from which the
kernel computes the weights per row). The peers are handed the per-row targets and per-row factors
``weight / (H * valid count of the head)`` precomputed outside the timed region, which favours them.

- ``floor``: the three GEMMs every implementation must do (``X W^T``, ``G W``, ``G^T X`` over all rows),
  no loss at all: the time no implementation can beat;
- ``naive``: what a plain PyTorch trainer writes, the memory baseline: per head, its logits through
  ``F.linear`` and float32 ``F.cross_entropy``, weighted, summed; autograd;
- ``compile``: ``torch.compile`` of ``naive``;
- ``cce``: Cut Cross-Entropy's ``linear_cross_entropy`` over all rows (its Triton ``cce`` kernel on CUDA,
  its ``torch_compile`` implementation on CPU), ``reduction="none"``, then the weighted sum;
- ``liger``: Liger-Kernel's fused linear cross-entropy over all rows, ``reduction="none"`` (per-token
  weights need it; Liger then recomputes the chunks in backward), then the weighted sum; CUDA only;
- ``liger-mean``: Liger unweighted with ``reduction="mean"``, its fast path (gradients in forward): not
  the same loss, shown as the best Liger can do;
- ``ours``: ``fused_weighted_mtp_loss`` with the weights; ``ours-td``: the same with values + rewards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wmtp_kernels import (
    IGNORE_INDEX,
    build_weights,
    compute_td_errors,
    fused_weighted_mtp_loss,
    head_valid_mask,
)

CPU_SHAPES = [(4, 256, 4, 512, 32000), (1, 256, 4, 512, 128256)]
CUDA_SHAPES = [(4, 2048, 4, 4096, 32000), (2, 2048, 4, 4096, 128256)]
IMPLS = ("floor", "naive", "compile", "cce", "liger", "liger-mean", "ours", "ours-td")
# Fixed TD options of the benchmark (the defaults of the API).
TD_BETA = 0.9


def row_targets_and_factors(labels: torch.Tensor, weights: torch.Tensor, heads: int):
    """``[B, T, H]`` targets (``IGNORE_INDEX`` where not valid) and factors of the mean-reduced loss.

    Row ``(b, t, k)`` predicts ``labels[b, t + k]`` with weight ``weights[b, t + k - 1]``; the mean
    reduction averages each head over its valid rows, then the heads.
    """
    batch, seq = labels.shape
    targets = torch.full((batch, seq, heads), IGNORE_INDEX, dtype=torch.long, device=labels.device)
    factors = torch.zeros(batch, seq, heads, dtype=torch.float32, device=labels.device)
    for k in range(1, min(heads, seq - 1) + 1):
        valid = head_valid_mask(labels, None, k, IGNORE_INDEX)
        count = valid.sum().clamp(min=1)
        targets[:, : seq - k, k - 1] = torch.where(valid, labels[:, k:], IGNORE_INDEX)
        factors[:, : seq - k, k - 1] = valid * weights[:, k - 1 : seq - 1].float() / (heads * count)
    return targets, factors


def make_case(shape, dtype, device, seed=0) -> dict:
    """Inputs of one benchmark case (``hidden`` / ``weight`` require grad) and the peers' row data."""
    batch, seq, heads, dim, vocab = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(batch, seq, heads, dim, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * dim**-0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    values = torch.rand(batch, seq, generator=g).to(device)
    rewards = torch.rand(batch, generator=g).to(device)
    weights = build_weights(compute_td_errors(values, rewards), beta=TD_BETA)
    targets, factors = row_targets_and_factors(labels, weights, heads)
    return {
        "hidden": hidden,
        "weight": weight,
        "labels": labels,
        "weights": weights,
        "values": values,
        "rewards": rewards,
        "targets": targets,
        "factors": factors,
    }


def naive_loss(hidden, weight, targets, factors):
    """Per head: logits through ``F.linear``, float32 ``F.cross_entropy``, weighted sum (autograd)."""
    loss = hidden.new_zeros((), dtype=torch.float32)
    for k in range(hidden.shape[2]):
        logits = F.linear(hidden[:, :, k], weight).float().flatten(0, 1)
        ce = F.cross_entropy(logits, targets[:, :, k].flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        loss = loss + (ce * factors[:, :, k].flatten()).sum()
    return loss


_compiled_naive = torch.compile(naive_loss)


def _flat_rows(case):
    return case["hidden"].flatten(0, 2), case["targets"].flatten(), case["factors"].flatten()


def loss_of(impl: str, case: dict, chunk_size: int | None = None) -> torch.Tensor:
    """The loss of ``impl`` on ``case`` (graph attached; ``floor`` has none)."""
    hidden, weight = case["hidden"], case["weight"]
    if impl == "ours":
        return fused_weighted_mtp_loss(
            hidden, weight, case["labels"], weights=case["weights"], chunk_size=chunk_size
        )
    if impl == "ours-td":
        return fused_weighted_mtp_loss(
            hidden, weight, case["labels"], values=case["values"], rewards=case["rewards"],
            beta=TD_BETA, chunk_size=chunk_size,
        )  # fmt: skip
    if impl == "naive":
        return naive_loss(hidden, weight, case["targets"], case["factors"])
    if impl == "compile":
        return _compiled_naive(hidden, weight, case["targets"], case["factors"])
    rows, targets, factors = _flat_rows(case)
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        kind = "cce" if hidden.is_cuda else "torch_compile"
        ce = linear_cross_entropy(rows, weight, targets, impl=kind, reduction="none")
        return (ce.float() * factors).sum()
    if impl in ("liger", "liger-mean"):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        if impl == "liger-mean":
            return liger_fused_linear_cross_entropy(rows, weight, targets, reduction="mean")
        ce = liger_fused_linear_cross_entropy(rows, weight, targets, reduction="none")
        return (ce.float() * factors).sum()
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def floor_gemms(case: dict) -> None:
    """The three GEMMs of the loss over all rows, no loss: the floor."""
    with torch.no_grad():
        x = case["hidden"].flatten(0, 2)
        w = case["weight"]
        g = x @ w.t()
        _ = g @ w
        _ = g.t() @ x


def step(impl: str, case: dict, chunk_size: int | None = None) -> torch.Tensor | None:
    """One forward + backward of ``impl``; returns the detached loss (``None`` for the floor)."""
    if impl == "floor":
        floor_gemms(case)
        return None
    loss = loss_of(impl, case, chunk_size)
    loss.backward()
    return loss.detach()


def clear_grads(case: dict) -> None:
    case["hidden"].grad = None
    case["weight"].grad = None


def available(impl: str, device: str) -> tuple[bool, str]:
    """Whether ``impl`` can run here (the peers are optional), and why not."""
    if impl not in IMPLS:
        return False, f"unknown implementation {impl!r}"
    if impl == "cce":
        try:
            import cut_cross_entropy  # noqa: F401
        except ImportError:
            return False, "cut-cross-entropy not installed (pip install -e '.[bench]')"
    if impl.startswith("liger"):
        if device != "cuda":
            return False, "Liger-Kernel needs CUDA"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return False, "liger-kernel not installed"
    return True, ""
