"""Shapes of the MTP Llama: :class:`ModelArgs` (Meta's ``params.json`` keys plus the value head options)
and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

VALUE_HEAD_KINDS = ("mlp", "linear", "hazard")
VALUE_OUTPUTS = ("sigmoid", "identity")


@dataclass(frozen=True)
class ModelArgs:
    """Shapes of an MTP Llama model (Meta's ``params.json`` keys plus the value head options).

    Frozen: derive variants with ``dataclasses.replace``.
    """

    dim: int
    """Model (residual stream) width d."""
    n_layers: int
    """Total number of transformer blocks: trunk + H head blocks (Meta's convention)."""
    n_heads: int
    """Attention query heads."""
    vocab_size: int
    """Vocabulary size V of the embedding and of the shared unembedding."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means ``n_heads`` (plain multi-head)."""
    multiple_of: int = 256
    """The SwiGLU hidden width is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    """Optional scale of the SwiGLU hidden width (Llama 2 70B / Llama 3 use it)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    n_future_tokens: int = 4
    """Number of prediction heads H (1 = a plain next-token Llama)."""
    max_seq_len: int = 4096
    """Longest sequence accepted by the forward passes."""
    value_head: str = "mlp"
    """``"mlp"`` (RMSNorm, Linear(d, d), SiLU, Linear(d, 1)), ``"linear"`` (RMSNorm, Linear(d, 1)) or
    ``"hazard"`` (the MLP's value times the survival of a second MLP's per-token hazards, accumulated over
    the completion tokens so far: a token judged wrong lowers V at every later position; see
    :class:`~wmtp_train.model.value_head.ValueHead`). The MLP is the default: a critic of P(success) from
    a shared trunk benefits from a non-linearity of its own, at a cost of d² + d parameters."""
    value_output: str = "sigmoid"
    """``"sigmoid"`` squashes V to (0, 1), matching V ≈ P(success) with rewards in {0, 1};
    ``"identity"`` leaves V unbounded, for rewards outside [0, 1]."""

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "n_future_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelArgs.{name} must be a positive int, got {value!r}")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 1:
            raise ValueError(f"ModelArgs.max_seq_len must be a positive int, got {self.max_seq_len!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"ModelArgs.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head dim, got dim / n_heads = {self.head_dim}")
        if self.n_kv_heads is not None and (
            not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads
        ):
            raise ValueError(
                f"ModelArgs.n_kv_heads ({self.n_kv_heads!r}) must be a positive divisor of "
                f"n_heads ({self.n_heads})"
            )
        if self.n_layers < self.n_future_tokens:
            raise ValueError(
                f"ModelArgs.n_layers ({self.n_layers}) must be >= n_future_tokens ({self.n_future_tokens}): "
                "each head is one block"
            )
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            raise ValueError(
                f"ModelArgs.ffn_dim_multiplier must be > 0 or None, got {self.ffn_dim_multiplier!r}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"ModelArgs.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelArgs.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.value_head not in VALUE_HEAD_KINDS:
            raise ValueError(
                f"ModelArgs.value_head must be one of {VALUE_HEAD_KINDS}, got {self.value_head!r}"
            )
        if self.value_output not in VALUE_OUTPUTS:
            raise ValueError(
                f"ModelArgs.value_output must be one of {VALUE_OUTPUTS}, got {self.value_output!r}"
            )
        if self.value_head == "hazard" and self.value_output != "sigmoid":
            raise ValueError(
                "ModelArgs.value_head='hazard' needs value_output='sigmoid' (its survival factor scales a "
                f"probability), got value_output={self.value_output!r}"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Resolved number of key/value heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def n_trunk_layers(self) -> int:
        """Blocks shared by all heads."""
        return self.n_layers - self.n_future_tokens

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden width, computed exactly as Meta's Llama ``FeedForward`` does."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_params_json(cls, params: dict[str, Any], **overrides: Any) -> ModelArgs:
        """Build from the dict of a Meta ``params.json`` (plus optional overrides).

        Keys that are not fields (Meta's ``max_batch_size``, ``use_scaled_rope: false``) are ignored
        only when they cannot change the model; anything else unknown is an error.

        Args:
            params: the parsed ``params.json``. ``n_future_tokens`` defaults to 1 (a plain Llama).
            overrides: field values that replace those of ``params`` (e.g. ``vocab_size`` when the
                file says -1, or ``value_head``).

        Returns:
            The validated arguments.
        """
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict, got {type(params).__name__}")
        merged = {"n_future_tokens": 1, **params, **overrides}
        field_names = {f.name for f in dataclasses.fields(cls)}
        harmless = {"max_batch_size"}
        if merged.pop("use_scaled_rope", False):
            raise ValueError("params.json: use_scaled_rope=true (Llama 3.1 RoPE scaling) is not supported")
        unknown = sorted(set(merged) - field_names - harmless)
        if unknown:
            raise ValueError(f"params.json: unknown keys {unknown}; known keys are {sorted(field_names)}")
        return cls(**{k: v for k, v in merged.items() if k in field_names})

    def to_params_json(self) -> dict[str, Any]:
        """The Meta ``params.json`` dict (Meta's keys only, so Meta's own loader accepts it)."""
        meta_keys = (
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "multiple_of",
            "ffn_dim_multiplier",
            "norm_eps",
            "rope_theta",
            "n_future_tokens",
            "max_seq_len",
        )
        return {k: getattr(self, k) for k in meta_keys}


PRESETS: dict[str, ModelArgs] = {
    # ~1.5 M parameters: 4 trunk blocks + 4 head blocks, GQA 4/2, byte vocabulary (256 bytes + pad, bos,
    # eos, one reserved id: wmtp_train.data.tokenizer.ByteTokenizer). Trains on a 2-core CPU.
    "micro": ModelArgs(
        dim=128,
        n_layers=8,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=260,
        multiple_of=32,
        n_future_tokens=4,
        max_seq_len=2048,
    ),
    # ~6.1 M parameters, the byte vocabulary of micro at twice its width (8 heads of 32, GQA 8/4); a
    # training step costs ~2.7x micro's on one CPU thread. Tried as a wider base for the synthetic task's
    # critic, which it did not help (README, "Why the critic does not learn").
    "mini": ModelArgs(
        dim=256,
        n_layers=8,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=260,
        multiple_of=64,
        n_future_tokens=4,
        max_seq_len=2048,
    ),
    # ~70 M parameters with the Llama 2 sentencepiece vocabulary.
    "small": ModelArgs(
        dim=512,
        n_layers=12,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=32000,
        multiple_of=128,
        n_future_tokens=4,
        max_seq_len=2048,
    ),
    # The shapes of Meta's 7B_1T_4 release: 28 trunk blocks + 4 head blocks, FFN 11008.
    "7b_1t_4": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        vocab_size=32000,
        multiple_of=256,
        norm_eps=1e-5,
        rope_theta=10000.0,
        n_future_tokens=4,
        max_seq_len=4096,
    ),
}


def resolve_args(args_or_preset: ModelArgs | str) -> ModelArgs:
    """A :class:`ModelArgs` from itself or a preset name.

    Args:
        args_or_preset: model arguments or a key of :data:`PRESETS`.

    Returns:
        The arguments.
    """
    if isinstance(args_or_preset, ModelArgs):
        return args_or_preset
    if isinstance(args_or_preset, str):
        if args_or_preset not in PRESETS:
            raise ValueError(f"unknown model preset {args_or_preset!r}; presets are {sorted(PRESETS)}")
        return PRESETS[args_or_preset]
    raise TypeError(f"args_or_preset must be ModelArgs or a preset name, got {type(args_or_preset).__name__}")
