"""Model FLOPs per trained token of each stage, for MFU: ``tokens/s per GPU * FLOPs per token / peak FLOP/s``.

Counted as PaLM's appendix B counts them: 2 FLOPs per multiply-add of every weight matrix a token passes
through in the forward pass, twice that in the backward pass where the weights train (their gradient) or
where a gradient flows on to trained weights below (the input's gradient), and attention's two ``T x T``
matrix products (``QK^T`` and ``AV``, ``2 * T * d`` multiply-adds per token and block, not halved for the
causal mask). Activation checkpointing's recomputation is not counted (it is not model work); the norms,
softmax and the other elementwise work are negligible at 7B.
"""

from __future__ import annotations

from wmtp_train.model import ModelArgs


def block_matmul_params(args: ModelArgs) -> int:
    """Weights of one transformer block's matrix products (attention projections and SwiGLU)."""
    kv = args.kv_heads * args.head_dim
    return 2 * args.dim * args.dim + 2 * args.dim * kv + 3 * args.dim * args.ffn_hidden_dim


def flops_per_token(args: ModelArgs, seq_len: int, stage: str, unfreeze_trunk: bool = False) -> float:
    """Model FLOPs of one trained token in a step of ``stage`` (forward and backward).

    Stage 2 trains everything: each token passes the trunk and all H head blocks, and each head's
    unembedding (the fused loss's three GEMMs: logits, their gradient to the hidden state and to the
    weight). Stage 1 runs the trunk forward only (frozen unless ``unfreeze_trunk``) and trains the value
    head.

    Args:
        args: the model's shapes.
        seq_len: tokens per sequence (attention's cost grows with it).
        stage: ``stage1`` or ``stage2``.
        unfreeze_trunk: stage 1 trains the trunk too.

    Returns:
        FLOPs per token.
    """
    if stage not in ("stage1", "stage2"):
        raise ValueError(f"stage must be 'stage1' or 'stage2', got {stage!r}")
    d = args.dim
    block = 2 * block_matmul_params(args) + 4 * seq_len * d  # forward FLOPs of one block per token
    value_head = {"mlp": 2 * (d * d + d), "hazard": 4 * (d * d + d), "linear": 2 * d}[args.value_head]
    if stage == "stage2":
        heads = args.n_future_tokens * (block + 2 * args.vocab_size * d)
        return 3 * (args.n_trunk_layers * block + heads + value_head)
    trunk = args.n_trunk_layers * block
    return (3 if unfreeze_trunk else 1) * trunk + 3 * value_head
