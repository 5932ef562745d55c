import dataclasses

import pytest
import torch
import torch.nn.functional as F
from meta_reference import apply_rotary_emb, precompute_freqs_cis

from wmtp_kernels import WeightingOptions
from wmtp_train.model import PRESETS, LossOptions, ModelArgs, MTPTransformer, build_model
from wmtp_train.model.layers import apply_rotary, attention_bias, positions_from_mask, rotary_tables

TINY = ModelArgs(
    dim=32, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, n_future_tokens=3
)


def tiny_model(**overrides) -> MTPTransformer:
    model = build_model(dataclasses.replace(TINY, **overrides))
    # Non-zero value projection so that value tests see the trunk (it starts at zero by design).
    torch.nn.init.normal_(model.value_head.proj.weight, std=0.5)
    return model


# ----------------------------------------------------------------------------------------------- args


def test_ffn_hidden_dim_matches_meta_llama():
    assert PRESETS["7b_1t_4"].ffn_hidden_dim == 11008
    # Llama 3 8B: dim 4096, ffn_dim_multiplier 1.3, multiple_of 1024 -> 14336.
    llama3 = ModelArgs(
        dim=4096, n_layers=32, n_heads=32, vocab_size=128256, multiple_of=1024, ffn_dim_multiplier=1.3
    )
    assert llama3.ffn_hidden_dim == 14336


@pytest.mark.parametrize("preset", ["micro", "mini"])
def test_byte_presets_fit_the_byte_tokenizer(preset):
    from wmtp_train.data.tokenizer import ByteTokenizer

    model = build_model(preset)
    assert model.args.vocab_size == ByteTokenizer().vocab_size
    assert model.args.n_future_tokens == 4
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == pytest.approx({"micro": 1.56e6, "mini": 6.10e6}[preset], rel=0.01)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dim", 30, "divisible by n_heads"),
        ("n_kv_heads", 3, "n_kv_heads"),
        ("n_layers", 2, "n_future_tokens"),
        ("vocab_size", 0, "vocab_size"),
        ("value_head", "deep", "value_head"),
        ("value_output", "tanh", "value_output"),
        ("norm_eps", 0.0, "norm_eps"),
        ("dim", 36, "even head dim"),
    ],
)
def test_model_args_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **{field: value})


def test_from_params_json():
    params = {"dim": 32, "n_layers": 4, "n_heads": 4, "vocab_size": 50, "multiple_of": 16, "norm_eps": 1e-6}
    args = ModelArgs.from_params_json({**params, "max_batch_size": 32})
    assert args.n_future_tokens == 1  # a plain Llama checkpoint
    assert args.norm_eps == 1e-6
    assert ModelArgs.from_params_json(params, n_future_tokens=4).n_future_tokens == 4
    with pytest.raises(ValueError, match="unknown keys.*'n_expert'"):
        ModelArgs.from_params_json({**params, "n_expert": 8})
    with pytest.raises(ValueError, match="use_scaled_rope"):
        ModelArgs.from_params_json({**params, "use_scaled_rope": True})
    assert ModelArgs.from_params_json(args.to_params_json()) == dataclasses.replace(args, max_seq_len=4096)


# -------------------------------------------------------------------------------------------- presets


def test_7b_1t_4_preset_shapes_on_meta_device():
    model = build_model("7b_1t_4", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert len(model.layers) == 29 and len(model.extra_heads) == 3  # 28 trunk + 4 head blocks
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["tok_embeddings.weight"] == (32000, 4096)
    assert shapes["layers.0.attention.wq.weight"] == (4096, 4096)
    assert shapes["layers.28.attention.wk.weight"] == (4096, 4096)
    assert shapes["extra_heads.2.feed_forward.w1.weight"] == (11008, 4096)
    assert shapes["extra_heads.2.feed_forward.w2.weight"] == (4096, 11008)
    assert shapes["head.output.weight"] == (32000, 4096)
    llama = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("value_head."))
    assert llama == 6_738_415_616  # Llama 2 7B: the 32 blocks are split between trunk and heads
    value_head = sum(p.numel() for p in model.value_head.parameters())
    assert value_head == 4096 + (4096 * 4096 + 4096) + (4096 + 1)


def test_micro_preset_matches_byte_tokenizer_and_is_small():
    args = PRESETS["micro"]
    assert args.vocab_size == 260 and args.n_future_tokens == 4
    model = build_model("micro")
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params * 4 * 4 < 64 * 2**20  # params + grads + 2 Adam moments, fp32: far under 1 GB


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("13b")


# ----------------------------------------------------------------------------------------------- rope


@pytest.mark.parametrize("offset", [0, 7])
def test_rotary_matches_meta_complex_implementation(offset):
    head_dim, seqlen, theta = 16, 12, 500.0
    x = torch.randn(2, seqlen, 3, head_dim)
    positions = torch.arange(offset, offset + seqlen)
    ours = apply_rotary(x, rotary_tables(positions, head_dim, theta))
    freqs_cis = precompute_freqs_cis(head_dim, offset + seqlen, theta)[offset:]
    torch.testing.assert_close(ours, apply_rotary_emb(x, freqs_cis), rtol=1e-6, atol=1e-6)


def test_rotary_is_pairwise_interleaved():
    # Rotating (1, 0, 0, 0...) at position 1 moves mass into component 1 (its complex partner), not hd/2.
    head_dim = 8
    x = torch.zeros(1, 1, 1, head_dim)
    x[..., 0] = 1.0
    out = apply_rotary(x, rotary_tables(torch.tensor([1]), head_dim, 10000.0))
    assert out[..., 1].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item())
    assert out[..., head_dim // 2].item() == 0.0


# ---------------------------------------------------------------------------------------- attention


def test_grouped_kv_heads_equal_repeated_multi_head():
    gqa = tiny_model()
    mha = build_model(dataclasses.replace(TINY, n_kv_heads=None))
    state = gqa.state_dict()
    hd, n_rep = TINY.head_dim, TINY.n_heads // TINY.kv_heads
    for name, tensor in list(state.items()):
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            # Query head i reads KV head i // n_rep: repeat each KV head's rows n_rep times.
            per_kv_head = tensor.view(TINY.kv_heads, hd, TINY.dim)
            state[name] = per_kv_head.repeat_interleave(n_rep, dim=0).reshape(-1, TINY.dim)
    mha.load_state_dict(state)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    torch.testing.assert_close(gqa.full_forward(tokens).hidden, mha.full_forward(tokens).hidden)


def test_future_tokens_do_not_change_earlier_outputs():
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (1, 12))
    changed = tokens.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % TINY.vocab_size
    a, b = model.full_forward(tokens, return_logits=True), model.full_forward(changed, return_logits=True)
    torch.testing.assert_close(a.hidden[:, :6], b.hidden[:, :6])
    torch.testing.assert_close(a.values[:, :6], b.values[:, :6])
    assert not torch.allclose(a.hidden[:, 6:], b.hidden[:, 6:])


def test_head_order_head1_is_last_layer_then_extra_heads():
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 8))
    before = model.full_forward(tokens)
    with torch.no_grad():
        model.extra_heads[0].feed_forward.w2.weight.add_(0.5)
    after = model.full_forward(tokens)
    changed = [not torch.allclose(before.hidden[:, :, k], after.hidden[:, :, k]) for k in range(3)]
    assert changed == [False, True, False]  # extra_heads[0] is head 2
    torch.testing.assert_close(before.values, after.values)  # the critic reads the trunk only
    with torch.no_grad():
        model.layers[-1].feed_forward.w2.weight.add_(0.5)
    last = model.full_forward(tokens)
    assert not torch.allclose(after.hidden[:, :, 0], last.hidden[:, :, 0])
    torch.testing.assert_close(after.hidden[:, :, 1:], last.hidden[:, :, 1:])
    torch.testing.assert_close(model.full_forward(tokens, n_heads=1).hidden, last.hidden[:, :, :1])


def test_positions_and_attention_mask_from_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    allowed = attention_bias(mask)[:, 0]
    assert allowed.any(-1).all()  # no empty softmax row (SDPA on CUDA would give NaN)
    assert allowed[0, 1].tolist() == [False, True, False, False, False]  # a left pad sees itself only
    assert allowed[0, 4].tolist() == [False, False, True, True, True]
    assert allowed[1, 4].tolist() == [True, True, True, False, True]  # a right pad: real keys + itself
    assert not allowed.triu(1).any()  # causal


def pad(tokens: torch.Tensor, width: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = tokens.numel()
    ids, mask = torch.zeros(width, dtype=torch.long), torch.zeros(width, dtype=torch.long)
    where = slice(width - n, width) if left else slice(0, n)
    ids[where], mask[where] = tokens, 1
    return ids, mask


def test_left_and_right_padding_give_the_same_states_on_real_tokens():
    # RoPE scores depend on relative positions only, so this checks masking; the mask-derived absolute
    # positions (which a KV cache needs) are checked directly above.
    model = tiny_model()
    seqs = [torch.randint(1, TINY.vocab_size, (n,)) for n in (10, 6, 3)]
    width = 10
    outs = {}
    for left in (False, True):
        ids, mask = zip(*(pad(s, width, left) for s in seqs))
        ids, mask = torch.stack(ids), torch.stack(mask)
        out = model.full_forward(ids, mask, return_logits=True)
        trunk = model.trunk_forward(ids, mask)
        for t in (out.hidden, out.values, out.logits, trunk.hidden, trunk.values):
            assert torch.isfinite(t).all()  # padded queries included
        real = mask.bool()
        outs[left] = [(out.hidden[b][real[b]], out.values[b][real[b]]) for b in range(len(seqs))]
        torch.testing.assert_close(trunk.values, out.values)
    for b, seq in enumerate(seqs):
        alone = model.full_forward(seq.unsqueeze(0))
        for left in (False, True):
            torch.testing.assert_close(outs[left][b][0], alone.hidden[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(outs[left][b][1], alone.values[0], rtol=1e-5, atol=1e-5)


def test_value_head_options():
    tokens = torch.randint(0, TINY.vocab_size, (2, 7))
    sig = tiny_model().trunk_forward(tokens).values
    assert sig.shape == (2, 7, 1) and ((sig > 0) & (sig < 1)).all()
    fresh = build_model(TINY).trunk_forward(tokens).values
    torch.testing.assert_close(fresh, torch.full_like(fresh, 0.5))  # zero-initialised projection
    lin = tiny_model(value_head="linear", value_output="identity")
    assert lin.value_head.hidden is None
    assert (lin.trunk_forward(tokens).values.abs() > 1).any()  # unsquashed


# ---------------------------------------------------------------------------------------- building


def test_meta_device_build_then_to_empty_and_init():
    torch.manual_seed(3)
    direct = build_model(TINY)
    torch.manual_seed(3)
    model = build_model(TINY, device="meta")
    assert all(t.is_meta for t in model.state_dict().values())
    model.to_empty(device="cpu")
    model.init_weights()
    for (name, a), b in zip(direct.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert model.head.output.weight.std().item() == pytest.approx(TINY.dim**-0.5, rel=0.2)
    out = model.full_forward(torch.randint(0, TINY.vocab_size, (2, 5)), return_logits=True)
    assert torch.isfinite(out.logits).all()


def test_bfloat16_forward():
    model = build_model(TINY, dtype=torch.bfloat16)
    out = model(torch.randint(0, TINY.vocab_size, (2, 6)))
    assert out.values.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_input_validation():
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 6))
    with pytest.raises(ValueError, match="input_ids must be"):
        model.trunk_forward(tokens[0])
    with pytest.raises(TypeError, match="int64"):
        model.trunk_forward(tokens.float())
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.full_forward(tokens, torch.ones(2, 5))
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model(max_seq_len=4).trunk_forward(tokens)
    with pytest.raises(ValueError, match="n_heads"):
        model.full_forward(tokens, n_heads=4)
    with pytest.raises(ValueError, match="either weights or rewards"):
        model(tokens, weights=torch.ones(2, 6), rewards=torch.ones(2))
    with pytest.raises(ValueError, match="labels shape"):
        model(tokens, labels=tokens[:, :3])


# -------------------------------------------------------------------------------------------- loss


def spec_weighted_mtp_loss(logits, labels, mask, weights):
    """The loss of docs/DESIGN.md: head k at t predicts labels[t + k] with weight weights[t + k - 1]."""
    seq, heads = logits.shape[1], logits.shape[2]
    per_head = []
    for k in range(1, heads + 1):
        targets = labels[:, k:].clamp_min(0)
        ce = F.cross_entropy(logits[:, : seq - k, k - 1].transpose(1, 2), targets, reduction="none")
        valid = (mask[:, : seq - k] * mask[:, k:] * (labels[:, k:] != -100)).float()
        per_head.append((ce * weights[:, k - 1 : seq - 1] * valid).sum() / valid.sum().clamp_min(1))
    return torch.stack(per_head).mean()


def test_forward_loss_matches_spec_from_full_forward_logits():
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (3, 9))
    mask = torch.ones_like(tokens)
    mask[1, 6:] = 0
    mask[2, :2] = 0
    labels = tokens.masked_fill(torch.arange(9) < 3, -100)  # a 3-token prompt
    logits = model.full_forward(tokens, mask, return_logits=True).logits
    uniform = model(tokens, mask, labels)
    torch.testing.assert_close(uniform.loss, spec_weighted_mtp_loss(logits, labels, mask, torch.ones(3, 9)))
    weights = torch.rand(3, 9) + 0.5
    weighted = model(tokens, mask, labels, weights=weights)
    torch.testing.assert_close(weighted.loss, spec_weighted_mtp_loss(logits, labels, mask, weights))


def test_rewards_build_td_weights_from_detached_values():
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 8))
    rewards = torch.tensor([1.0, 0.0])
    out = model(
        tokens, rewards=rewards, loss_options=LossOptions(WeightingOptions(beta=0.5), return_stats=True)
    )
    values = out.values.detach().squeeze(-1)
    td = torch.cat([values[:, 1:] - values[:, :-1], rewards[:, None] - values[:, -1:]], dim=1)
    expected_weights = torch.exp(td / 0.5).clamp(0.1, 5.0)
    logits = model.full_forward(tokens, return_logits=True).logits
    expected = spec_weighted_mtp_loss(logits, tokens, torch.ones_like(tokens), expected_weights)
    torch.testing.assert_close(out.loss, expected)
    assert {"ce_head1", "ce_head3"} <= set(out.stats)
    out.loss.backward()
    assert model.value_head.proj.weight.grad is None  # the policy loss does not train the critic


def test_reference_loss_implementation_matches_fused_loss_and_gradients():
    tokens = torch.randint(0, TINY.vocab_size, (2, 8))
    rewards = torch.tensor([1.0, 0.0])
    results = {}
    for implementation in ("fused", "reference"):
        torch.manual_seed(0)
        model = tiny_model()
        options = LossOptions(WeightingOptions(terminal="last_transition"), implementation=implementation)
        loss = model(tokens, rewards=rewards, loss_options=options).loss
        loss.backward()
        results[implementation] = (loss.detach(), model.head.output.weight.grad.clone())
    torch.testing.assert_close(results["fused"][0], results["reference"][0])
    torch.testing.assert_close(results["fused"][1], results["reference"][1])


def test_unknown_loss_implementation_is_rejected():
    tokens = torch.randint(0, TINY.vocab_size, (1, 5))
    with pytest.raises(ValueError, match="implementation"):
        tiny_model()(tokens, loss_options=LossOptions(implementation="cuda"))


def test_micro_overfits_one_batch():
    model = build_model("micro")
    tokens = torch.randint(0, 256, (4, 32))
    mask = torch.ones_like(tokens)
    mask[0, 24:] = 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        out = model(tokens, mask)
        (out.loss + ((out.values.squeeze(-1) - 1.0) ** 2).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.6 * losses[0]
    assert model.value_head.proj.weight.abs().sum() > 0  # the value loss reaches the critic
