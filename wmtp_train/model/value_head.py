"""The critic: a value head V(s_t) ≈ P(success | x_<=t) on the raw trunk states."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wmtp_train.model.args import ModelArgs
from wmtp_train.model.layers import RMSNorm

HAZARD_INIT_BIAS = -6.0
"""The hazard MLP's output bias at initialisation: softplus(-6) ≈ 0.0025 per token, so a fresh hazard head
starts close to the plain MLP head."""


class ValueHead(nn.Module):
    """Critic V(s_t) from raw trunk states: its own RMSNorm, then an MLP or a linear map to one scalar.

    ``value_head="hazard"`` adds a second MLP g of the same normed states and returns
    ``V_t = sigmoid(f(h_t)) * exp(-sum_{s <= t, s in value_mask} softplus(g(h_s)))``: a completion token
    the head finds wrong (large hazard) lowers V at that position and every later one, so a mutant is
    detected once, at its mutated token, instead of at every later position as a per-token head must.

    The value projection starts at zero, so V starts at sigmoid(0) = 0.5 (or 0 with ``"identity"``); the
    hazard starts at softplus(-6) per token.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.squash = args.value_output == "sigmoid"
        self.hidden = nn.Linear(args.dim, args.dim) if args.value_head in ("mlp", "hazard") else None
        self.proj = nn.Linear(args.dim, 1)
        if args.value_head == "hazard":
            self.hazard_hidden = nn.Linear(args.dim, args.dim)
            self.hazard_proj = nn.Linear(args.dim, 1)
        else:
            self.hazard_hidden = self.hazard_proj = None

    def forward(self, trunk_hidden: torch.Tensor, value_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, d] raw trunk states -> [B, T, 1] values.

        Args:
            trunk_hidden: [B, T, d] raw trunk states.
            value_mask: [B, T], nonzero at the positions whose token accumulates hazard (the completion
                tokens); None: every position. Only the hazard head reads it.
        """
        if value_mask is not None and value_mask.shape != trunk_hidden.shape[:2]:
            raise ValueError(
                f"value_mask shape {tuple(value_mask.shape)} != the trunk states' [B, T] "
                f"{tuple(trunk_hidden.shape[:2])}"
            )
        x = self.norm(trunk_hidden)
        h = F.silu(self.hidden(x)) if self.hidden is not None else x
        v = self.proj(h)
        v = torch.sigmoid(v) if self.squash else v
        if self.hazard_proj is None:
            return v
        hazard = F.softplus(self.hazard_proj(F.silu(self.hazard_hidden(x))).float())
        if value_mask is not None:
            hazard = hazard * (value_mask != 0).unsqueeze(-1)
        return (v.float() * torch.exp(-torch.cumsum(hazard, dim=1))).to(v.dtype)

    def init_weights(self) -> None:
        """Fresh init (also what a loaded Meta checkpoint gets)."""
        self.norm.reset_parameters()
        for hidden in (self.hidden, self.hazard_hidden):
            if hidden is not None:
                std = hidden.in_features**-0.5
                nn.init.trunc_normal_(hidden.weight, std=std, a=-3 * std, b=3 * std)
                nn.init.zeros_(hidden.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        if self.hazard_proj is not None:
            nn.init.zeros_(self.hazard_proj.weight)
            nn.init.constant_(self.hazard_proj.bias, HAZARD_INIT_BIAS)
