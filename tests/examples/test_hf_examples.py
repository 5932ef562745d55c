"""The Hugging Face examples run on tiny models built from configs (no download) and do what they say."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from wmtp_kernels import fused_weighted_mtp_loss  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_h1_fused_loss_equals_the_models_own_loss_and_gradients():
    result = load("hf_next_token").compare()
    assert result["fused_loss"] == pytest.approx(result["hf_loss"], rel=1e-6)
    assert result["max_grad_diff"] < 1e-6


def test_left_padding_is_where_hf_and_the_fused_loss_differ():
    """HF trains the prediction made from the last padding position; the fused loss never does."""
    example = load("hf_next_token")
    model = example.tiny_llama()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        hf = model(input_ids, attention_mask, labels=labels).loss
        ours = example.fused_loss(model, input_ids, attention_mask, labels)
        assert (hf - ours).abs() > 1e-3
        labels[1, 4] = -100  # the first real token: HF would predict it from padding
        hf = model(input_ids, attention_mask, labels=labels).loss
        ours = example.fused_loss(model, input_ids, attention_mask, labels)
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=1e-6)


def test_h4_heads_train_with_td_weights_from_the_value_head():
    example = load("hf_mtp_heads")
    model = example.tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask, labels, rewards = example.synthetic_batch(model.model.config.vocab_size, 0)
    hidden, values = model(ids, mask)
    assert hidden.shape == (*ids.shape, 4, model.model.config.hidden_size) and values.shape == (*ids.shape, 1)
    # head 1 is the model's own next-token head: its slice reproduces the model's loss
    head1 = fused_weighted_mtp_loss(hidden[:, :, :1], model.model.lm_head.weight, labels, mask)
    torch.testing.assert_close(head1, model.model(ids, mask, labels=labels).loss, rtol=1e-6, atol=1e-6)

    losses, trained = example.train(steps=30)  # starts from the same seed, hence from `before`
    assert losses[-1] < 0.8 * losses[0], losses
    for prefix in ("extra_heads.", "value_head.", "model.lm_head."):
        changed = [
            n for n, p in trained.named_parameters() if n.startswith(prefix) and not torch.equal(p, before[n])
        ]
        assert changed, f"no parameter under {prefix} was trained"
