"""The options and constants shared by every part of the package: one definition each.

Importing this module pulls in nothing but the standard library, so the reference implementation, the fast
paths and the trainer can all use it without depending on one another.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
"""Label value of a position that is not trained (prompt tokens, padding), as in ``F.cross_entropy``."""

REDUCTIONS = ("mean", "sum", "none")
TERMINAL_MODES = ("last_state", "last_transition")


@dataclass(frozen=True)
class WeightingOptions:
    """How token weights are built from critic values (docs/DESIGN.md "§ TD errors", "§ Weights").

    Attributes:
        gamma: Discount of the intermediate TD errors.
        beta: Temperature of the exponential weighting; must be positive.
        min_weight: Lower clip of the weights.
        max_weight: Upper clip of the weights.
        terminal: ``"last_state"`` (td[last] = R - V[last]) or ``"last_transition"`` (textbook TD(0)).
    """

    gamma: float = 1.0
    beta: float = 0.9
    min_weight: float = 0.1
    max_weight: float = 5.0
    terminal: str = "last_state"

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.min_weight <= self.max_weight:
            raise ValueError(
                f"need 0 <= min_weight <= max_weight, got min_weight={self.min_weight}, "
                f"max_weight={self.max_weight}"
            )
        if self.terminal not in TERMINAL_MODES:
            raise ValueError(f"terminal must be one of {TERMINAL_MODES}, got {self.terminal!r}")
