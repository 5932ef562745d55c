"""The ``hazard`` value head: its survival factor, its mask, checkpoints and the model's passes."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from wmtp_train.model import ModelArgs, build_model, export_meta_checkpoint, load_meta_checkpoint
from wmtp_train.model.value_head import HAZARD_INIT_BIAS

TINY = ModelArgs(
    dim=32, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, n_future_tokens=3
)


def hazard_and_mlp_models():
    """A hazard-head model and an MLP-head model with the same weights everywhere else."""
    torch.manual_seed(0)
    hazard = build_model(dataclasses.replace(TINY, value_head="hazard"))
    torch.nn.init.normal_(hazard.value_head.proj.weight, std=0.5)
    mlp = build_model(TINY)
    mlp.load_state_dict(hazard.state_dict(), strict=False)
    return hazard, mlp


def test_constant_hazard_halves_v_at_each_masked_token_from_there_on():
    hazard, mlp = hazard_and_mlp_models()
    torch.nn.init.zeros_(hazard.value_head.hazard_proj.weight)
    torch.nn.init.constant_(hazard.value_head.hazard_proj.bias, math.log(math.expm1(math.log(2.0))))
    tokens = torch.randint(0, TINY.vocab_size, (2, 7))
    value_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 0, 0, 1]])
    got = hazard.trunk_forward(tokens, value_mask=value_mask).values[..., 0]
    plain = mlp.trunk_forward(tokens).values[..., 0]
    survival = 0.5 ** value_mask.cumsum(dim=1)  # softplus(bias) = ln 2 per masked token
    torch.testing.assert_close(got, plain * survival)


def test_a_token_lowers_v_at_its_position_and_later_only():
    hazard, _ = hazard_and_mlp_models()
    torch.nn.init.normal_(hazard.value_head.hazard_proj.weight, std=1.0)
    hidden = torch.randn(1, 6, TINY.dim)
    mask = torch.ones(1, 6)
    before = hazard.value_head(hidden, mask)[0, :, 0]
    changed = hidden.clone()
    changed[0, 3] += 5.0
    after = hazard.value_head(changed, mask)[0, :, 0]
    torch.testing.assert_close(after[:3], before[:3])  # causal: earlier values do not see token 3
    head = hazard.value_head
    old, new = (
        F.softplus(head.hazard_proj(F.silu(head.hazard_hidden(head.norm(h[0, 3])))))
        for h in (hidden, changed)
    )
    f_after = torch.sigmoid(head.proj(F.silu(head.hidden(head.norm(changed[0, 4:])))))[:, 0]
    f_before = torch.sigmoid(head.proj(F.silu(head.hidden(head.norm(hidden[0, 4:])))))[:, 0]
    # Later positions keep their own f but carry token 3's new hazard.
    torch.testing.assert_close(after[4:] / f_after, before[4:] / f_before * torch.exp(old - new))


def test_fresh_hazard_head_starts_near_the_plain_head():
    model = build_model(dataclasses.replace(TINY, value_head="hazard"))
    tokens = torch.randint(0, TINY.vocab_size, (1, 5))
    values = model.trunk_forward(tokens).values[0, :, 0]
    per_token = F.softplus(torch.tensor(HAZARD_INIT_BIAS))
    torch.testing.assert_close(values, 0.5 * torch.exp(-per_token * torch.arange(1, 6)))


def test_value_mask_defaults_to_the_attention_mask_and_reaches_every_pass():
    hazard, _ = hazard_and_mlp_models()
    torch.nn.init.normal_(hazard.value_head.hazard_proj.weight, std=1.0)
    tokens = torch.randint(0, TINY.vocab_size, (2, 6))
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    completion = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    default = hazard.trunk_forward(tokens, attention).values
    torch.testing.assert_close(default, hazard.trunk_forward(tokens, attention, attention).values)
    masked = hazard.trunk_forward(tokens, attention, completion).values
    assert not torch.allclose(masked, default)
    torch.testing.assert_close(hazard.full_forward(tokens, attention, value_mask=completion).values, masked)
    labels = tokens.masked_fill(completion == 0, -100)
    out = hazard(tokens, attention, labels, rewards=torch.tensor([1.0, 0.0]), value_mask=completion)
    torch.testing.assert_close(out.values, masked)
    torch.testing.assert_close(
        hazard(tokens, attention, trunk_only=True, value_mask=completion).values, masked
    )


def test_bad_value_mask_and_options_are_named():
    hazard, mlp = hazard_and_mlp_models()
    tokens = torch.randint(0, TINY.vocab_size, (2, 6))
    for model in (hazard, mlp):
        with pytest.raises(ValueError, match=r"value_mask shape \(2, 5\)"):
            model.trunk_forward(tokens, value_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="value_output='sigmoid'"):
        dataclasses.replace(TINY, value_head="hazard", value_output="identity")


def test_hazard_head_round_trips_and_another_kind_gets_a_fresh_head(tmp_path):
    hazard, mlp = hazard_and_mlp_models()
    torch.nn.init.normal_(hazard.value_head.hazard_proj.weight, std=1.0)
    tokens = torch.randint(0, TINY.vocab_size, (1, 6))
    export_meta_checkpoint(hazard, tmp_path / "hazard")
    loaded, args = load_meta_checkpoint(tmp_path / "hazard")
    assert args.value_head == "hazard"
    torch.testing.assert_close(loaded.trunk_forward(tokens).values, hazard.trunk_forward(tokens).values)
    export_meta_checkpoint(mlp, tmp_path / "mlp")
    switched, args = load_meta_checkpoint(tmp_path / "mlp", value_head="hazard")
    assert args.value_head == "hazard"
    fresh = build_model(dataclasses.replace(TINY, value_head="hazard"))
    fresh.load_state_dict(switched.state_dict())
    fresh.value_head.init_weights()
    torch.testing.assert_close(switched.trunk_forward(tokens).values, fresh.trunk_forward(tokens).values)
