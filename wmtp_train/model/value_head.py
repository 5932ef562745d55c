"""The critic: a value head V(s_t) ≈ P(success | x_<=t) on the raw trunk states."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wmtp_train.model.args import ModelArgs
from wmtp_train.model.layers import RMSNorm


class ValueHead(nn.Module):
    """Critic V(s_t) from raw trunk states: its own RMSNorm, then an MLP or a linear map to one scalar.

    The last projection starts at zero, so V starts at sigmoid(0) = 0.5 (or 0 with ``"identity"``).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.squash = args.value_output == "sigmoid"
        if args.value_head == "mlp":
            self.hidden = nn.Linear(args.dim, args.dim)
            self.proj = nn.Linear(args.dim, 1)
        else:
            self.hidden = None
            self.proj = nn.Linear(args.dim, 1)

    def forward(self, trunk_hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, d] raw trunk states -> [B, T, 1] values."""
        x = self.norm(trunk_hidden)
        if self.hidden is not None:
            x = F.silu(self.hidden(x))
        v = self.proj(x)
        return torch.sigmoid(v) if self.squash else v

    def init_weights(self) -> None:
        """Fresh init (also what a loaded Meta checkpoint gets)."""
        self.norm.reset_parameters()
        if self.hidden is not None:
            std = self.hidden.in_features**-0.5
            nn.init.trunc_normal_(self.hidden.weight, std=std, a=-3 * std, b=3 * std)
            nn.init.zeros_(self.hidden.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
