"""WMTP kernels: fused TD-error weighting and H-offset weighted multi-token cross-entropy.

The reference implementations live in :mod:`wmtp_kernels.reference`.
"""

from wmtp_kernels.reference import (
    IGNORE_INDEX,
    build_weights,
    compute_td_errors,
    compute_td_stats,
    compute_weight_stats,
    explained_variance,
    value_loss,
)

__all__ = [
    "IGNORE_INDEX",
    "build_weights",
    "compute_td_errors",
    "compute_td_stats",
    "compute_weight_stats",
    "explained_variance",
    "value_loss",
]
