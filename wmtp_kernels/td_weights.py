"""TD errors of a critic and the clipped exponential token weights built from them (production).

One formula, :func:`td_terms`, gives the TD error at any set of ``(b, j)`` positions: on the whole
``[B, T]`` grid for :func:`compute_td_errors`, on the rows of a chunk for the torch chunk primitive. Its
gradient with respect to the values and rewards is written out in :func:`td_weight_grads` (no autograd
graph, so it runs inside a custom operator and is never recomputed by activation checkpointing). The
conventions (both terminal modes, padding) are docs/DESIGN.md "§ TD errors" and "§ Weights";
:mod:`wmtp_kernels.reference` holds an independent plain implementation that the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wmtp_kernels._validation import batch_and_seq, check_float, check_mask, check_values_rewards
from wmtp_kernels.masks import last_token_index
from wmtp_kernels.options import WeightingOptions


@dataclass(frozen=True)
class TDTerms:
    """TD errors at some positions and which formula produced each.

    Attributes:
        td: TD error at each position (0 on padding and where no formula applies).
        outcome: Bool, ``td = R[b] - V[b, j]`` (the terminal position of the chosen mode).
        bootstrap: Bool, ``td = gamma * V[b, j + 1] - V[b, j]``.
    """

    td: torch.Tensor
    outcome: torch.Tensor
    bootstrap: torch.Tensor


def td_terms(
    values: torch.Tensor,
    rewards: torch.Tensor,
    real: torch.Tensor,
    last: torch.Tensor,
    b: torch.Tensor,
    j: torch.Tensor,
    gamma: float,
    terminal: str,
) -> TDTerms:
    """TD errors at positions ``(b, j)`` (index tensors of one broadcast shape).

    Args:
        values: ``[B, T]`` critic values.
        rewards: ``[B]`` rewards, dtype of ``values``.
        real: ``[B, T]`` bool, real tokens.
        last: ``[B]`` int64 index of the last real token (``-1`` for none).
        b: Batch indices.
        j: Position indices in ``[0, T)``.
        gamma: Discount.
        terminal: ``"last_state"`` (``td[last] = R - V[last]``) or ``"last_transition"``
            (``td[last - 1] = R - V[last - 1]``, ``td[last] = 0``).

    Returns:
        The :class:`TDTerms` at those positions.
    """
    j_next = (j + 1).clamp(max=values.shape[1] - 1)
    last_b = last[b]
    real_j = real[b, j]
    outcome = real_j & (j == (last_b if terminal == "last_state" else last_b - 1))
    bootstrap = real_j & (j < last_b) & real[b, j_next] & ~outcome
    v_j = values[b, j]
    td = torch.where(bootstrap, gamma * values[b, j_next] - v_j, 0.0)
    td = torch.where(outcome, rewards[b] - v_j, td)
    return TDTerms(td, outcome, bootstrap)


def _grid(batch: int, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(batch, device=device)[:, None], torch.arange(seq, device=device)[None, :]


def _real(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(like, dtype=torch.bool) if attention_mask is None else attention_mask.bool()


def _grid_terms(
    values: torch.Tensor,
    rewards: torch.Tensor,
    attention_mask: torch.Tensor | None,
    gamma: float,
    terminal: str,
) -> TDTerms:
    v = values.reshape(values.shape[0], values.shape[1])
    real = _real(attention_mask, v)
    b, j = _grid(v.shape[0], v.shape[1], v.device)
    return td_terms(v, rewards.to(v.dtype), real, last_token_index(real), b, j, gamma, terminal)


def compute_td_errors(
    values: torch.Tensor,
    rewards: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    terminal: str = "last_state",
) -> torch.Tensor:
    """TD errors of a critic along each sequence (docs/DESIGN.md "§ TD errors").

    Intermediate: ``td[t] = gamma * V[t+1] - V[t]`` where t and t+1 are real and t < last.
    ``terminal="last_state"``: ``td[last] = R - V[last]``.
    ``terminal="last_transition"``: ``td[last-1] = R - V[last-1]`` and ``td[last] = 0`` (a row with a
    single real token has no transition and gets all zeros). Padding positions are 0.

    Args:
        values: ``[B, T]`` or ``[B, T, 1]`` critic values V(s_t).
        rewards: ``[B]`` sequence rewards.
        attention_mask: ``[B, T]``, nonzero for real tokens; ``None`` means all real.
        gamma: Discount factor.
        terminal: ``"last_state"`` or ``"last_transition"``.

    Returns:
        ``[B, T]`` TD errors in the dtype of ``values``; differentiable in values and rewards.
    """
    batch, seq = batch_and_seq("values", values)
    check_values_rewards(values, rewards, batch, seq)
    check_mask(attention_mask, batch, seq)
    WeightingOptions(gamma=gamma, terminal=terminal)
    return _grid_terms(values, rewards, attention_mask, gamma, terminal).td


def build_weights(
    td_errors: torch.Tensor, beta: float = 0.9, min_weight: float = 0.1, max_weight: float = 5.0
) -> torch.Tensor:
    """Exponential, clipped token weights ``clamp(exp(td / beta), min_weight, max_weight)``.

    Args:
        td_errors: TD errors of any shape.
        beta: Temperature, > 0.
        min_weight: Lower clip.
        max_weight: Upper clip.

    Returns:
        Weights with the shape and dtype of ``td_errors``; differentiable (zero gradient where clipped).
    """
    check_float("td_errors", td_errors)
    WeightingOptions(beta=beta, min_weight=min_weight, max_weight=max_weight)
    return (td_errors / beta).exp().clamp(min_weight, max_weight)


def token_weights(
    weights: torch.Tensor | None,
    values: torch.Tensor | None,
    rewards: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    like: torch.Tensor,
    options: WeightingOptions,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``[B, T]`` token weights from the given source, and the TD errors when they are computed.

    Args:
        weights: Precomputed ``[B, T]`` weights, or ``None``.
        values: ``[B, T(, 1)]`` critic values (with ``rewards``), or ``None``.
        rewards: ``[B]`` rewards, or ``None``.
        attention_mask: ``[B, T]`` mask or ``None``.
        like: A ``[B, T, ...]`` tensor whose dtype and device uniform weights take.
        options: TD and weighting options.

    Returns:
        ``(weights, td)``; ``td`` is ``None`` unless the weights were built from values; with no source
        the weights are ones.
    """
    if weights is not None:
        return weights, None
    if values is None:
        return torch.ones(like.shape[:2], dtype=like.dtype, device=like.device), None
    td = _grid_terms(values, rewards, attention_mask, options.gamma, options.terminal).td
    return (td / options.beta).exp().clamp(options.min_weight, options.max_weight), td


def td_weight_grads(
    grad_weights: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    attention_mask: torch.Tensor | None,
    options: WeightingOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain ``d loss / d weight[b, j]`` through the clipped weights and TD errors to values and rewards.

    ``w = clamp(exp(td / beta), lo, hi)`` passes ``w / beta`` where ``lo <= exp(td / beta) <= hi`` (as
    ``torch.clamp`` does) and nothing where clipped; ``td = R - V[j]`` sends it to ``R`` and
    ``-V[j]``; ``td = gamma * V[j + 1] - V[j]`` to ``gamma * V[j + 1]`` and ``-V[j]``.

    Args:
        grad_weights: ``[B, T]`` gradient of the loss with respect to each token weight.
        values: ``[B, T(, 1)]`` critic values (read, not differentiated).
        rewards: ``[B]`` rewards.
        attention_mask: ``[B, T]`` mask or ``None``.
        options: TD and weighting options.

    Returns:
        ``(d_values [B, T], d_rewards [B])`` in the dtype of ``grad_weights``.
    """
    dtype = grad_weights.dtype
    v = values.detach().to(dtype)
    terms = _grid_terms(v, rewards.detach(), attention_mask, options.gamma, options.terminal)
    raw = (terms.td / options.beta).exp()
    unclipped = (raw >= options.min_weight) & (raw <= options.max_weight)
    d_td = torch.where(unclipped, grad_weights * raw / options.beta, 0.0)
    from_outcome = torch.where(terms.outcome, d_td, 0.0)
    from_bootstrap = torch.where(terms.bootstrap, d_td, 0.0)
    d_values = -(from_outcome + from_bootstrap)
    d_values[:, 1:] += options.gamma * from_bootstrap[:, :-1]  # bootstrap at j reads V[j + 1]
    return d_values, from_outcome.sum(dim=1)
