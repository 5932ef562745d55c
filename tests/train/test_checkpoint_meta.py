import json

import pytest
import torch
from meta_reference import meta_forward_logits, random_meta_state_dict

from wmtp_train.model import build_model
from wmtp_train.model.meta_checkpoint import export_meta_checkpoint, load_meta_checkpoint, meta_key

PARAMS = {
    "dim": 32,
    "n_layers": 5,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 61,
    "multiple_of": 16,
    "ffn_dim_multiplier": None,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "n_future_tokens": 3,
}


def write_meta_checkpoint(directory, params, state, weights_name="consolidated.pth"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    torch.save(state, directory / weights_name)
    return directory


@pytest.fixture
def meta_dir(tmp_path):
    return write_meta_checkpoint(tmp_path / "ckpt", PARAMS, random_meta_state_dict(PARAMS, seed=1))


def test_loads_every_parameter_from_meta_format(meta_dir):
    state = torch.load(meta_dir / "consolidated.pth", weights_only=True)
    model, args = load_meta_checkpoint(meta_dir)
    assert args.n_future_tokens == 3 and args.kv_heads == 2 and args.vocab_size == 61
    assert len(model.layers) == 3 and len(model.extra_heads) == 2
    for name, param in model.named_parameters():
        assert param.requires_grad, name
        if not name.startswith("value_head."):
            torch.testing.assert_close(param, state[meta_key(name)], rtol=0, atol=0, msg=name)
    assert torch.all(model.value_head.proj.weight == 0)  # fresh value head, V = 0.5 everywhere


def test_loaded_model_matches_an_independent_meta_forward(meta_dir):
    """Key mapping, complex-pair RoPE, GQA grouping and head order against Meta's math."""
    state = torch.load(meta_dir / "consolidated.pth", weights_only=True)
    model, _ = load_meta_checkpoint(meta_dir)
    tokens = torch.randint(0, PARAMS["vocab_size"], (2, 11))
    ours = model.full_forward(tokens, return_logits=True).logits
    torch.testing.assert_close(ours, meta_forward_logits(state, PARAMS, tokens), rtol=1e-4, atol=1e-4)


def test_a_half_rotation_convention_would_be_caught(meta_dir):
    # Sanity of the test above: permuting wq/wk rows from interleaved pairs to the half-split layout
    # (what HF conversions do) must change the logits, so the comparison is sensitive to the convention.
    original = torch.load(meta_dir / "consolidated.pth", weights_only=True)
    state = dict(original)
    hd = PARAMS["dim"] // PARAMS["n_heads"]
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    for key in [k for k in state if k.endswith(("wq.weight", "wk.weight"))]:
        w = state[key]
        state[key] = w.view(-1, hd, w.shape[1])[:, perm].reshape_as(w)
    write_meta_checkpoint(meta_dir, PARAMS, state)
    model, _ = load_meta_checkpoint(meta_dir)
    tokens = torch.randint(0, PARAMS["vocab_size"], (1, 11))
    reference = meta_forward_logits(original, PARAMS, tokens)
    assert not torch.allclose(model.full_forward(tokens, return_logits=True).logits, reference, atol=1e-3)


def test_missing_unexpected_and_misshaped_keys_are_listed_together(tmp_path):
    state = random_meta_state_dict(PARAMS)
    del state["layers.1.feed_forward.w3.weight"]
    state["layers.9.attention.wq.weight"] = torch.zeros(32, 32)
    state["extra_heads.0.attention.wk.weight"] = torch.zeros(32, 32)  # GQA expects [16, 32]
    directory = write_meta_checkpoint(tmp_path, PARAMS, state)
    with pytest.raises(ValueError) as err:
        load_meta_checkpoint(directory)
    message = str(err.value)
    assert "missing keys ['layers.1.feed_forward.w3.weight']" in message
    assert "unexpected keys ['layers.9.attention.wq.weight']" in message
    assert "extra_heads.0.attention.wk.weight: checkpoint (32, 32) vs model (16, 32)" in message


def test_wrong_head_count_is_rejected(tmp_path):
    # A checkpoint with 3 heads read as 4 heads: extra_heads.2 missing, layers.2 unexpected.
    directory = write_meta_checkpoint(
        tmp_path, {**PARAMS, "n_future_tokens": 4}, random_meta_state_dict(PARAMS)
    )
    with pytest.raises(ValueError, match=r"missing keys \['extra_heads\.2\..*unexpected keys \['layers\.2\."):
        load_meta_checkpoint(directory)


def test_vocab_size_minus_one_is_read_from_the_embedding(tmp_path):
    directory = write_meta_checkpoint(tmp_path, {**PARAMS, "vocab_size": -1}, random_meta_state_dict(PARAMS))
    _, args = load_meta_checkpoint(directory)
    assert args.vocab_size == PARAMS["vocab_size"]


def test_dtype_defaults_to_the_checkpoints_and_can_be_overridden(tmp_path):
    state = random_meta_state_dict(PARAMS, dtype=torch.bfloat16)
    directory = write_meta_checkpoint(tmp_path, PARAMS, state)
    model, _ = load_meta_checkpoint(directory)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model32, _ = load_meta_checkpoint(directory, dtype=torch.float32)
    assert {p.dtype for p in model32.parameters()} == {torch.float32}
    torch.testing.assert_close(model32.tok_embeddings.weight, state["tok_embeddings.weight"].float())


def test_missing_files_and_model_parallel_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json"):
        load_meta_checkpoint(tmp_path)
    state = random_meta_state_dict(PARAMS)
    write_meta_checkpoint(tmp_path, PARAMS, state, "consolidated.00.pth")
    model, _ = load_meta_checkpoint(tmp_path)  # a single numbered shard is the whole model
    torch.testing.assert_close(model.head.output.weight, state["output.weight"])
    torch.save(state, tmp_path / "consolidated.01.pth")
    with pytest.raises(ValueError, match="2 model-parallel shards"):
        load_meta_checkpoint(tmp_path)


def test_loaded_model_trains(meta_dir):
    model, _ = load_meta_checkpoint(meta_dir)
    tokens = torch.randint(0, PARAMS["vocab_size"], (2, 8))
    out = model(tokens, rewards=torch.tensor([1.0, 0.0]))
    (out.loss + out.values.mean()).backward()
    assert model.layers[0].attention.wq.weight.grad is not None
    assert model.value_head.proj.weight.grad is not None


def test_export_then_load_is_identical(tmp_path):
    model = build_model("micro")
    torch.nn.init.normal_(model.value_head.proj.weight)  # a trained-looking critic must survive
    directory = export_meta_checkpoint(model, tmp_path / "export")
    files = sorted(p.name for p in directory.iterdir())
    assert files == ["consolidated.pth", "params.json", "value_head.pth"]  # no temp files left
    params = json.loads((directory / "params.json").read_text())
    assert "value_head" not in params and params["n_future_tokens"] == 4
    saved = torch.load(directory / "consolidated.pth", weights_only=True)
    assert {"norm.weight", "output.weight"} <= set(saved)
    assert not any(k.startswith("value") for k in saved)

    loaded, args = load_meta_checkpoint(directory)
    assert args == model.args
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    tokens = torch.randint(0, 260, (2, 12))
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0
    a = model.full_forward(tokens, mask, return_logits=True)
    b = loaded.full_forward(tokens, mask, return_logits=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)


def test_exported_checkpoint_without_value_head_file_gets_a_fresh_critic(tmp_path):
    model = build_model("micro")
    torch.nn.init.normal_(model.value_head.proj.weight)
    directory = export_meta_checkpoint(model, tmp_path)
    (directory / "value_head.pth").unlink()
    loaded, _ = load_meta_checkpoint(directory)
    assert torch.all(loaded.value_head.proj.weight == 0)
    torch.testing.assert_close(loaded.head.output.weight, model.head.output.weight)
