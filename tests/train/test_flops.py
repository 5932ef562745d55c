"""Model FLOPs per token against a count from the model's own modules."""

import pytest
from torch import nn

from wmtp_train.model import build_model, resolve_args
from wmtp_train.train.flops import flops_per_token


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("preset", ["micro", "7b_1t_4"])
def test_flops_per_token_counts_every_matrix_a_token_passes(preset):
    args = resolve_args(preset)
    model = build_model(preset, device="meta")
    seq = 2048
    blocks = [*model.layers, *model.extra_heads]  # every token passes the trunk and each head block once
    attention = 2 * 2 * seq * args.dim * len(blocks)  # QK^T and AV, multiply-adds x 2, per token
    heads = args.n_future_tokens * model.head.output.weight.numel()  # one unembedding per head
    forward = 2 * (sum(_linear_weights(b) for b in blocks) + heads + _linear_weights(model.value_head))
    assert flops_per_token(args, seq, "stage2") == 3 * (forward + attention)
    trunk = model.layers[:-1]
    trunk_forward = 2 * sum(_linear_weights(b) for b in trunk) + 2 * 2 * seq * args.dim * len(trunk)
    value_head = 2 * _linear_weights(model.value_head)
    assert flops_per_token(args, seq, "stage1") == trunk_forward + 3 * value_head
    assert flops_per_token(args, seq, "stage1", unfreeze_trunk=True) == 3 * (trunk_forward + value_head)


def test_seven_b_is_about_six_flops_per_parameter_and_token():
    args = resolve_args("7b_1t_4")
    params = sum(p.numel() for p in build_model(args, device="meta").parameters())
    ratio = flops_per_token(args, 2048, "stage2") / params
    assert 6.0 < ratio < 7.0  # 6 N, plus the three extra unembeddings and attention, minus the embedding
    with pytest.raises(ValueError, match="stage"):
        flops_per_token(args, 2048, "stage3")
