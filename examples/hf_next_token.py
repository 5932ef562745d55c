"""The fused loss at H = 1 on a Hugging Face ``LlamaForCausalLM``: the model's own loss and gradients.

With one head, ``fused_weighted_mtp_loss`` is next-token cross-entropy: feed it the final-normed hidden
states (``model.model(...).last_hidden_state``, viewed as ``[B, T, 1, d]``) and ``lm_head.weight``, and
it equals ``model(..., labels=labels).loss`` without ever building the ``[B, T, V]`` logits. Labels are
the input ids with ``-100`` on padding (and on prompt tokens, if any), exactly what the HF loss takes.

The one difference is left padding: HF trains the prediction *made from* the last padding position
(of the first real token) unless that token's label is ``-100``; the fused loss never trains a
prediction made from a padding position. With right padding, as here, both agree.

Run: ``python examples/hf_next_token.py`` (``pip install -e ".[hf]"``; builds a tiny random model).
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from wmtp_kernels import fused_weighted_mtp_loss


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama built from a config (no download)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).float()


def right_padded_batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (right padding) and ``labels`` (-100 on padding and a prompt)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    attention_mask[2, 5:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :4] = -100  # a prompt that is not trained
    return input_ids, attention_mask, labels


def fused_loss(model: LlamaForCausalLM, input_ids, attention_mask, labels) -> torch.Tensor:
    """The model's next-token loss through the fused kernel (H = 1)."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return fused_weighted_mtp_loss(hidden.unsqueeze(2), model.lm_head.weight, labels, attention_mask)


def compare(seed: int = 0) -> dict[str, float]:
    """Loss and largest gradient difference between the fused loss and the model's own loss."""
    model = tiny_llama(seed)
    batch = right_padded_batch(model.config.vocab_size, seed)
    results = {}
    for name, loss_fn in (("hf", lambda: model(*batch[:2], labels=batch[2]).loss), ("fused", None)):
        model.zero_grad()
        loss = loss_fn() if loss_fn else fused_loss(model, *batch)
        loss.backward()
        results[name] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (hf_loss, hf_grads), (fused, fused_grads) = results["hf"], results["fused"]
    grad_diff = max((fused_grads[n] - hf_grads[n]).abs().max().item() for n in hf_grads)
    return {"hf_loss": hf_loss, "fused_loss": fused, "max_grad_diff": grad_diff}


if __name__ == "__main__":
    print(compare())
