"""WMTP kernels: fused TD-error weighting and H-offset weighted multi-token cross-entropy.

Public API: :func:`fused_weighted_mtp_loss` (linear-fused, logits never materialised),
:class:`FusedWeightedMTPLoss` (its ``nn.Module`` form) and :func:`weighted_mtp_cross_entropy` (from
logits, gradient in place); the TD / weight / mask / statistics / critic functions the trainer shares
with them. :mod:`wmtp_kernels.reference` is the independent plain-PyTorch oracle of the tests.
"""

from wmtp_kernels.critic import explained_variance, value_loss
from wmtp_kernels.masks import (
    applied_weight_mask,
    count_mtp_targets,
    head_valid_mask,
    last_token_index,
    prediction_targets,
)
from wmtp_kernels.mtp_cross_entropy import weighted_mtp_cross_entropy
from wmtp_kernels.mtp_loss import FusedWeightedMTPLoss, fused_weighted_mtp_loss
from wmtp_kernels.options import IGNORE_INDEX, TERMINAL_MODES, WeightingOptions
from wmtp_kernels.stats import compute_td_stats, compute_weight_stats
from wmtp_kernels.td_weights import build_weights, compute_td_errors

__all__ = [
    "IGNORE_INDEX",
    "TERMINAL_MODES",
    "FusedWeightedMTPLoss",
    "WeightingOptions",
    "applied_weight_mask",
    "build_weights",
    "compute_td_errors",
    "compute_td_stats",
    "compute_weight_stats",
    "count_mtp_targets",
    "explained_variance",
    "fused_weighted_mtp_loss",
    "head_valid_mask",
    "prediction_targets",
    "last_token_index",
    "value_loss",
    "weighted_mtp_cross_entropy",
]
