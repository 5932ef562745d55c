"""LoRA on the micro model: the adapted linear, which projections are adapted, merging, the adapters file,
activation checkpointing of adapted blocks, and the ``[lora]`` table."""

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from wmtp_train.config_files import load_recipe
from wmtp_train.model import (
    LoRAOptions,
    apply_lora,
    build_model,
    export_lora_adapters,
    load_lora_adapters,
    merge_lora_state,
)
from wmtp_train.model.lora import LoRALinear

ALL = "wq,wk,wv,wo,w1,w2,w3"


def tokens(batch=2, seq=12, vocab=260, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def perturbed_adapters(model, seed=3):
    """Give every adapter a non-zero B (fresh adapters are an exact no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.weight.copy_(0.05 * torch.randn(module.lora_b.weight.shape, generator=gen))


def test_fresh_adapters_leave_the_model_unchanged():
    model = build_model("micro", device="cpu")
    ids = tokens()
    before = model.full_forward(ids, return_logits=True).logits
    apply_lora(model, LoRAOptions(enabled=True, rank=4))
    after = model.full_forward(ids, return_logits=True).logits
    assert torch.equal(before, after)


def test_targets_per_part():
    model = build_model("micro", device="meta")
    wrapped = apply_lora(model, LoRAOptions(enabled=True, trunk_targets="wq,w2", head_targets="wo"))
    n_layers = len(model.layers)
    trunk = [f"layers.{i}.{m}" for i in range(n_layers - 1) for m in ("attention.wq", "feed_forward.w2")]
    heads = [f"layers.{n_layers - 1}.attention.wo"] + [f"extra_heads.{i}.attention.wo" for i in range(3)]
    assert wrapped == trunk + heads
    assert isinstance(model.layers[0].feed_forward.w2, LoRALinear)
    assert type(model.layers[0].feed_forward.w1) is nn.Linear
    assert type(model.extra_heads[0].attention.wq) is nn.Linear
    with pytest.raises(ValueError, match="applied twice"):
        apply_lora(model, LoRAOptions(enabled=True, trunk_targets="wq", head_targets=""))


def test_base_weight_is_shared_not_copied():
    model = build_model("micro", device="cpu")
    weight = model.layers[0].attention.wq.weight
    apply_lora(model, LoRAOptions(enabled=True, rank=2))
    assert model.layers[0].attention.wq.weight is weight
    assert model.layers[0].attention.wq.lora_a.weight.shape == (2, 128)
    assert model.layers[0].attention.wq.lora_b.weight.shape == (128, 2)


def test_is_trained_names():
    options = LoRAOptions(enabled=True)
    assert options.is_trained("layers.0.attention.wq.lora_a.weight")
    assert options.is_trained("layers.0._checkpoint_wrapped_module.feed_forward.w1.lora_b.weight")
    assert options.is_trained("value_head.hidden.weight")
    assert not options.is_trained("layers.0.attention.wq.weight")
    assert not options.is_trained("head.output.weight")
    assert not options.is_trained("extra_heads.0.attention_norm.weight")
    assert not options.is_trained("tok_embeddings.weight")
    assert LoRAOptions(enabled=True, train_output_head=True).is_trained("head.norm.weight")


def test_merged_state_equals_the_adapted_model():
    torch.manual_seed(0)
    model = build_model("micro", device="cpu")
    options = LoRAOptions(enabled=True, rank=4, alpha=8.0)
    apply_lora(model, options)
    perturbed_adapters(model)
    ids = tokens()
    adapted = model.full_forward(ids, return_logits=True).logits
    plain = build_model("micro", device="meta")
    plain.load_state_dict(merge_lora_state(model.state_dict(), options.scaling), assign=True)
    merged = plain.full_forward(ids, return_logits=True).logits
    assert not torch.equal(
        adapted, build_model("micro", device="cpu").full_forward(ids, return_logits=True).logits
    )
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)


def test_adapters_file_round_trip(tmp_path):
    torch.manual_seed(0)
    base_state = build_model("micro", device="cpu").state_dict()
    model = build_model("micro", device="cpu")
    model.load_state_dict(base_state)
    options = LoRAOptions(enabled=True, rank=4, head_targets="wq", train_output_head=True)
    apply_lora(model, options)
    perturbed_adapters(model)
    with torch.no_grad():
        model.head.norm.weight.add_(0.1)
    path = export_lora_adapters(model.state_dict(), options, {"preset": "micro", "seed": 0}, tmp_path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(options.is_trained(key) for key in saved) and "head.norm.weight" in saved
    assert not any(key.endswith("attention.wq.weight") for key in saved)

    restored = build_model("micro", device="cpu")
    restored.load_state_dict(base_state)
    assert load_lora_adapters(restored, tmp_path) == options
    ids = tokens()
    torch.testing.assert_close(
        restored.full_forward(ids, return_logits=True).logits,
        model.full_forward(ids, return_logits=True).logits,
        rtol=0,
        atol=0,
    )


def test_adapters_file_must_match_the_model(tmp_path):
    model = build_model("micro", device="cpu")
    options = LoRAOptions(enabled=True, rank=4)
    apply_lora(model, options)
    path = export_lora_adapters(model.state_dict(), options, {}, tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"].pop("layers.0.attention.wq.lora_a.weight")
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"missing keys \['layers.0.attention.wq.lora_a.weight'\]"):
        load_lora_adapters(build_model("micro", device="cpu"), path)


def test_adapters_under_activation_checkpointing_get_the_same_gradients():
    torch.manual_seed(0)
    options = LoRAOptions(enabled=True, rank=4, dropout=0.1)
    models = []
    for wrap in (False, True):
        torch.manual_seed(0)
        model = build_model("micro", device="cpu")
        apply_lora(model, options)
        perturbed_adapters(model)
        if wrap:
            for i, block in enumerate(model.layers):
                model.layers[i] = checkpoint_wrapper(block)
        for name, param in model.named_parameters():
            param.requires_grad_(options.is_trained(name))
        torch.manual_seed(5)  # same dropout masks in both
        model(tokens()).loss.backward()
        models.append(model)
    plain, wrapped = (
        {n.replace("._checkpoint_wrapped_module", ""): p for n, p in m.named_parameters()} for m in models
    )
    assert plain.keys() == wrapped.keys()
    adapters = [name for name in plain if ".lora_" in name]
    assert len(adapters) == 2 * 7 * 8
    for name, param in plain.items():
        if name in adapters:  # the value head is trained too, but this loss does not reach it
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            torch.testing.assert_close(wrapped[name].grad, param.grad, rtol=1e-5, atol=1e-7)
        else:
            assert param.grad is None and wrapped[name].grad is None, name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.rank=0", "lora.rank must be a positive int"),
        ("lora.dropout=1.0", r"lora.dropout must be in \[0, 1\)"),
        ("lora.trunk_targets=wq,wx", r"lora.trunk_targets: unknown projections \['wx'\]"),
        ("lora.head_targets=wq,wq", "listed twice"),
    ],
)
def test_lora_table_validation(override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe("baseline", [override])


def test_lora_enabled_needs_a_target():
    with pytest.raises(ValueError, match="no adapter"):
        load_recipe("baseline", ["lora.enabled=true", "lora.trunk_targets=", "lora.head_targets="])
    config = load_recipe("baseline", ["lora.enabled=true", f"lora.head_targets={ALL}", "lora.trunk_targets="])
    assert config.lora.targets("trunk") == () and len(config.lora.targets("heads")) == 7
