"""Input validation shared by the reference and every backend.

Each check raises a ``ValueError`` or ``TypeError`` that names the offending argument and the shapes or
dtypes involved, so a caller never gets a silent wrong answer or an indexing error deep in a kernel.

Two kinds: checks of shapes, dtypes and devices read only metadata (they are traceable by
``torch.compile`` and run on fake tensors); the checks that read tensor data (label range, finite
rewards, ``check_finite``) synchronise with the device, so the linear-fused loss passes
``read_data=False`` and runs them inside its custom operator instead, counting the problems with
:func:`data_problem_counts` and reading the counts in the same synchronisation as its valid-row count.
"""

from __future__ import annotations

import torch

from wmtp_kernels.options import REDUCTIONS

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _shape(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else list(t.shape)


def batch_and_seq(name: str, t: torch.Tensor) -> tuple[int, int]:
    """``(B, T)`` of a ``[B, T]`` or ``[B, T, 1]`` tensor, or a ``ValueError`` naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape [B, T] or [B, T, 1], got {_shape(t)}")
    return t.shape[0], t.shape[1]


def check_reduction(reduction: str) -> None:
    """Raise unless ``reduction`` is one of ``mean``, ``sum``, ``none``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``t`` is a floating-point tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_mask(attention_mask: torch.Tensor | None, batch: int, seq: int) -> None:
    """Check an attention mask against the ``[B, T]`` it must have."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != (batch, seq):
        raise ValueError(
            f"attention_mask must have shape [B, T] = [{batch}, {seq}], got {_shape(attention_mask)}"
        )
    if attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool, integer or real, got dtype {attention_mask.dtype}")


def check_values_rewards(
    values: torch.Tensor,
    rewards: torch.Tensor,
    batch: int,
    seq: int,
    values_name: str = "values",
    read_data: bool = True,
) -> None:
    """Check critic ``values`` ([B, T] or [B, T, 1]) and ``rewards`` ([B], finite when ``read_data``)."""
    check_float(values_name, values)
    if values.shape not in ((batch, seq), (batch, seq, 1)):
        raise ValueError(
            f"{values_name} must have shape [B, T] or [B, T, 1] = [{batch}, {seq}(, 1)], got {_shape(values)}"
        )
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    check_float("rewards", rewards)
    if rewards.shape != (batch,):
        raise ValueError(f"rewards must have shape [B] = [{batch}], got {_shape(rewards)}")
    if read_data:
        check_finite(rewards=rewards)  # a NaN / Inf outcome is never a valid reward


def check_token_weight_inputs(
    weights: torch.Tensor | None,
    values: torch.Tensor | None,
    rewards: torch.Tensor | None,
    batch: int,
    seq: int,
    read_data: bool = True,
) -> None:
    """Check the weight source: ``weights``, or ``values`` + ``rewards``, or neither (uniform).

    Raises:
        ValueError: both sources given, only one of values / rewards, or a shape mismatch.
    """
    if weights is not None and (values is not None or rewards is not None):
        raise ValueError(
            "pass either weights, or values and rewards, not both "
            f"(weights {_shape(weights)}, values {_shape(values)}, rewards {_shape(rewards)})"
        )
    if (values is None) != (rewards is None):
        raise ValueError(
            f"values and rewards go together: got values {_shape(values)} and rewards {_shape(rewards)}"
        )
    if weights is not None:
        check_float("weights", weights)
        if weights.shape != (batch, seq):
            raise ValueError(f"weights must have shape [B, T] = [{batch}, {seq}], got {_shape(weights)}")
    if values is not None:
        check_values_rewards(values, rewards, batch, seq, read_data=read_data)


def check_labels(labels: torch.Tensor, batch: int, seq: int) -> None:
    """Check ``labels`` is an integer ``[B, T]`` tensor."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (token ids), got dtype {labels.dtype}")
    if labels.shape != (batch, seq):
        raise ValueError(f"labels must have shape [B, T] = [{batch}, {seq}], got {_shape(labels)}")


def _labels_out_of_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    return ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)


def data_problem_counts(
    labels: torch.Tensor, vocab: int, ignore_index: int, rewards: torch.Tensor | None
) -> torch.Tensor:
    """What :func:`check_data` looks for, counted on the device without synchronising.

    Returns:
        ``[2]`` int64 on the labels' device: label ids outside ``[0, V)`` that are not ``ignore_index``,
        and non-finite rewards. Read it (one synchronisation, which a caller can share with its own
        reads) and pass the numbers to :func:`raise_data_problems`.
    """
    bad_labels = _labels_out_of_range(labels, vocab, ignore_index).sum()
    if rewards is None or not rewards.is_floating_point():
        bad_rewards = torch.zeros_like(bad_labels)
    else:
        bad_rewards = (~torch.isfinite(rewards)).sum().to(bad_labels.device)
    return torch.stack([bad_labels, bad_rewards])


def raise_data_problems(
    counts: list[int], labels: torch.Tensor, vocab: int, ignore_index: int, rewards: torch.Tensor | None
) -> None:
    """Raise the error that :func:`data_problem_counts`'s (read) ``counts`` call for, if any."""
    bad_labels, bad_rewards = counts
    if bad_rewards:
        raise ValueError(_non_finite_message("rewards", rewards, bad_rewards))
    if bad_labels:
        bad = labels[_labels_out_of_range(labels, vocab, ignore_index)]
        raise ValueError(
            f"labels must lie in [0, V) = [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"found {bad.numel()} out of range, e.g. {bad[:5].tolist()}"
        )


def check_data(labels: torch.Tensor, vocab: int, ignore_index: int, rewards: torch.Tensor | None) -> None:
    """The checks that read data: label ids in ``[0, V)`` or ``ignore_index``, finite rewards.

    Args:
        labels: ``[B, T]`` integer token ids.
        vocab: V.
        ignore_index: Label value excluded from the loss.
        rewards: ``[B]`` rewards or ``None``.
    """
    counts = data_problem_counts(labels, vocab, ignore_index, rewards).tolist()
    raise_data_problems(counts, labels, vocab, ignore_index, rewards)


def check_nonempty(name: str, batch: int, seq: int) -> None:
    """Reject an empty batch (B == 0 or T == 0)."""
    if batch == 0 or seq == 0:
        raise ValueError(f"{name} is empty: B={batch}, T={seq}; need at least one token")


def check_finite(**tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the first given tensor that holds NaN or Inf."""
    for name, t in tensors.items():
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(_non_finite_message(name, t, int((~torch.isfinite(t)).sum())))


def _non_finite_message(name: str, t: torch.Tensor, n_bad: int) -> str:
    return f"{name} {_shape(t)} holds {n_bad} non-finite values (NaN or Inf)"


def check_logits_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    values: torch.Tensor | None,
    rewards: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    read_data: bool = True,
) -> tuple[int, int, int, int]:
    """Validate the inputs of the logits-based loss (with :func:`check_data` when ``read_data``).

    Returns:
        ``(B, T, H, V)``.
    """
    check_float("logits", logits)
    if logits.dim() != 4:
        raise ValueError(f"logits must have shape [B, T, H, V], got {_shape(logits)}")
    batch, seq, heads, vocab = logits.shape
    check_nonempty("logits", batch, seq)
    if heads == 0 or vocab == 0:
        raise ValueError(f"logits must have H >= 1 heads and V >= 1 classes, got {_shape(logits)}")
    check_reduction(reduction)
    check_labels(labels, batch, seq)
    check_mask(attention_mask, batch, seq)
    check_token_weight_inputs(weights, values, rewards, batch, seq, read_data=False)
    if read_data:
        check_data(labels, vocab, ignore_index, rewards)
    return batch, seq, heads, vocab


def check_hidden_inputs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    values: torch.Tensor | None,
    rewards: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    read_data: bool = True,
) -> tuple[int, int, int, int, int]:
    """Validate the inputs of the linear-fused loss (with :func:`check_data` when ``read_data``).

    ``lm_head_weight`` has the dtype of ``hidden``, or is float32 with bfloat16 / float16 hidden states
    (a float32 parameter under autocast).

    Returns:
        ``(B, T, H, d, V)``.
    """
    check_float("hidden", hidden)
    if hidden.dim() != 4:
        raise ValueError(f"hidden must have shape [B, T, H, d], got {_shape(hidden)}")
    batch, seq, heads, dim = hidden.shape
    check_nonempty("hidden", batch, seq)
    if heads == 0 or dim == 0:
        raise ValueError(f"hidden must have H >= 1 heads and d >= 1 features, got {_shape(hidden)}")
    check_float("lm_head_weight", lm_head_weight)
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != dim or lm_head_weight.shape[0] == 0:
        raise ValueError(
            f"lm_head_weight must have shape [V, d] with d = {dim} (from hidden {_shape(hidden)}), "
            f"got {_shape(lm_head_weight)}"
        )
    if lm_head_weight.dtype != hidden.dtype and not (
        hidden.dtype in LOW_PRECISION and lm_head_weight.dtype == torch.float32
    ):
        raise TypeError(
            f"lm_head_weight dtype {lm_head_weight.dtype} must match hidden dtype {hidden.dtype}, or be "
            "torch.float32 with bfloat16 / float16 hidden states (autocast)"
        )
    vocab = lm_head_weight.shape[0]
    if lm_head_bias is not None:
        check_float("lm_head_bias", lm_head_bias)
        if lm_head_bias.shape != (vocab,):
            raise ValueError(f"lm_head_bias must have shape [V] = [{vocab}], got {_shape(lm_head_bias)}")
    if lm_head_weight.device != hidden.device or labels.device != hidden.device:
        raise ValueError(
            f"hidden ({hidden.device}), lm_head_weight ({lm_head_weight.device}) and labels "
            f"({labels.device}) must be on one device"
        )
    check_reduction(reduction)
    check_labels(labels, batch, seq)
    check_mask(attention_mask, batch, seq)
    check_token_weight_inputs(weights, values, rewards, batch, seq, read_data=False)
    if read_data:
        check_data(labels, vocab, ignore_index, rewards)
    return batch, seq, heads, dim, vocab
