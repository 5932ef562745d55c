import pytest
import torch
from decoding_models import random_prompts, single_thread, tiny_decoder

from wmtp_train.data.tokenizer import ByteTokenizer
from wmtp_train.inference.generation import (
    DecodeStats,
    GenerationConfig,
    generate,
    generate_ids,
    left_pad,
    select_tokens,
)
from wmtp_train.inference.kv_cache import cached_forward, new_cache

PAD = ByteTokenizer.pad_id


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(seed=0)


def uncached_greedy(model, prompt: list[int], n_tokens: int) -> list[int]:
    """Greedy decoding that recomputes the full forward pass every step (no cache, no padding)."""
    ids = list(prompt)
    for _ in range(n_tokens):
        ids_t = torch.tensor([ids], device=model.tok_embeddings.weight.device)
        logits = model.full_forward(ids_t, return_logits=True, n_heads=1).logits
        ids.append(int(logits[0, -1, 0].argmax()))
    return ids[len(prompt) :]


def first_prefix_containing(tokens: list[int], stop: str) -> int:
    """Smallest n such that decode(tokens[:n]) contains ``stop``."""
    decode = ByteTokenizer().decode
    return next(n for n in range(1, len(tokens) + 1) if stop in decode(tokens[:n]))


# ------------------------------------------------------------------------------------------ the cache


def test_cached_forward_matches_full_forward_on_left_padded_batch(model):
    prompts = random_prompts(4, seed=3, min_len=2, max_len=10)
    ids, mask = left_pad(prompts, PAD, torch.device("cpu"))
    with torch.no_grad():
        full = model.full_forward(ids, mask, return_logits=True).logits
        cache = new_cache(model, len(prompts), model.n_future_tokens, capacity=2)  # forces growth
        # Prefill the first half, then feed the rest one token at a time.
        split = ids.shape[1] // 2
        pieces = [cached_forward(model, cache, ids[:, :split], mask[:, :split], model.n_future_tokens)]
        for t in range(split, ids.shape[1]):
            pieces.append(
                cached_forward(model, cache, ids[:, t : t + 1], mask[:, t : t + 1], model.n_future_tokens)
            )
    cached = torch.cat(pieces, dim=1)
    real = mask.unsqueeze(-1).unsqueeze(-1).expand_as(full)
    torch.testing.assert_close(cached[real], full[real], rtol=1e-5, atol=1e-5)
    assert cache.n_real.tolist() == [len(p) for p in prompts]


def test_dropped_slots_are_invisible(model):
    """A row with junk slots dropped gives the same logits as a row that never saw them."""
    prompt = random_prompts(1, seed=4, min_len=6, max_len=6)[0]
    junk = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        clean = new_cache(model, 1, 1, capacity=16)
        dirty = new_cache(model, 1, 1, capacity=16)
        ids = torch.tensor([prompt])
        ones = torch.ones_like(ids, dtype=torch.bool)
        cached_forward(model, clean, ids, ones, 1)
        cached_forward(model, dirty, ids, ones, 1)
        cached_forward(model, dirty, junk, torch.ones_like(junk, dtype=torch.bool), 1)
        dirty.drop(0, len(prompt), len(prompt) + 3)
        step = torch.tensor([[42]])
        expected = cached_forward(model, clean, step, torch.ones_like(step, dtype=torch.bool), 1)
        got = cached_forward(model, dirty, step, torch.ones_like(step, dtype=torch.bool), 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert dirty.n_real.tolist() == clean.n_real.tolist() == [len(prompt) + 1]


# ---------------------------------------------------------------------------------------------- greedy


def test_cached_greedy_equals_uncached_greedy_batched_left_padded(model):
    prompts = random_prompts(5, seed=1, min_len=1, max_len=14)
    assert len({len(p) for p in prompts}) > 2  # really different lengths, so really padded
    n_new = 16
    out = generate_ids(model, prompts, GenerationConfig(max_new_tokens=n_new), PAD)
    for prompt, generation in zip(prompts, out):
        assert generation.tokens == uncached_greedy(model, prompt, n_new)
        assert generation.finish_reason == "length"


def test_batched_equals_one_by_one(model):
    prompts = random_prompts(4, seed=2)
    config = GenerationConfig(max_new_tokens=10)
    batched = generate_ids(model, prompts, config, PAD)
    single = [generate_ids(model, [p], config, PAD)[0] for p in prompts]
    assert [g.tokens for g in batched] == [g.tokens for g in single]


def test_stop_token_ends_row(model):
    prompt = random_prompts(1, seed=5)[0]
    free = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=12), PAD)[0].tokens
    stop_id = free[5]
    first = free.index(stop_id)
    out = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=12, stop_token_ids=(stop_id,)), PAD)[
        0
    ]
    assert out.tokens == free[: first + 1]
    assert out.finish_reason == "eos"


def test_stop_sequence_cuts_text(model):
    tokenizer = ByteTokenizer()
    prompts = random_prompts(3, seed=6)
    free = generate_ids(model, prompts, GenerationConfig(max_new_tokens=20), PAD, tokenizer.decode)
    stop = free[0].text[6:8]
    config = GenerationConfig(max_new_tokens=20, stop_sequences=(stop,))
    out = generate_ids(model, prompts, config, PAD, tokenizer.decode)
    for before, after in zip(free, out):
        if stop in before.text:
            n = first_prefix_containing(before.tokens, stop)
            assert after.tokens == before.tokens[:n]
            assert after.finish_reason == "stop"
            assert after.text == tokenizer.decode(after.tokens).split(stop)[0]
            assert stop not in after.text
        else:
            assert after.tokens == before.tokens
            assert after.finish_reason == "length"


def test_generate_text_wrapper_adds_bos_and_stops_at_eos(model):
    tokenizer = ByteTokenizer()
    config = GenerationConfig(max_new_tokens=8)
    [out] = generate(model, tokenizer, ["def f():"], config)
    expected = uncached_greedy(model, tokenizer.encode("def f():", bos=True), 8)
    assert out.tokens[: len(expected)] == expected[: len(out.tokens)]
    if tokenizer.eos_id in expected:
        assert out.finish_reason == "eos"
    assert out.text == tokenizer.decode(out.tokens)


def test_stats_count_forwards_and_tokens(model):
    stats = DecodeStats()
    generate_ids(model, random_prompts(3, seed=7), GenerationConfig(max_new_tokens=6), PAD, stats=stats)
    assert stats.forwards == 6
    assert stats.generated_tokens == 18
    assert stats.tokens_per_forward == 1.0


# -------------------------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_with_a_seed(model):
    prompts = random_prompts(3, seed=8)
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=123)
    first = generate_ids(model, prompts, config, PAD)
    again = generate_ids(model, prompts, config, PAD)
    other = generate_ids(model, prompts, GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7), PAD)
    greedy = generate_ids(model, prompts, GenerationConfig(max_new_tokens=12), PAD)
    assert [g.tokens for g in first] == [g.tokens for g in again]
    assert [g.tokens for g in first] != [g.tokens for g in other]
    assert [g.tokens for g in first] != [g.tokens for g in greedy]


def test_tiny_top_p_equals_greedy(model):
    prompts = random_prompts(4, seed=9)
    greedy = generate_ids(model, prompts, GenerationConfig(max_new_tokens=10), PAD)
    nucleus = generate_ids(
        model, prompts, GenerationConfig(max_new_tokens=10, temperature=2.0, top_p=1e-6, seed=0), PAD
    )
    assert [g.tokens for g in nucleus] == [g.tokens for g in greedy]


def test_select_tokens_frequencies():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(4000, 3)
    g = torch.Generator().manual_seed(0)
    plain = torch.bincount(select_tokens(logits, 1.0, 1.0, g), minlength=3) / 4000
    torch.testing.assert_close(plain, probs, atol=0.03, rtol=0)
    # top_p = 0.6: the mass before token 1 is 0.5 < 0.6, before token 2 it is 0.8 -> tokens 0 and 1 kept.
    nucleus = torch.bincount(select_tokens(logits, 1.0, 0.6, g), minlength=3) / 4000
    torch.testing.assert_close(nucleus, torch.tensor([0.625, 0.375, 0.0]), atol=0.03, rtol=0)
    # Temperature 0.5 squares the probabilities before renormalising.
    cold = torch.bincount(select_tokens(logits, 0.5, 1.0, g), minlength=3) / 4000
    torch.testing.assert_close(cold, probs**2 / (probs**2).sum(), atol=0.03, rtol=0)
    assert select_tokens(logits[:2], 0.0, 1.0, None).tolist() == [0, 0]


# -------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop_sequences": ("",)}, "stop_sequences"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


def test_bad_prompts(model):
    with pytest.raises(ValueError, match="empty"):
        generate_ids(model, [[1, 2], []], GenerationConfig(), PAD)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_ids(model, [[1] * 10], GenerationConfig(max_new_tokens=model.args.max_seq_len), PAD)
    with pytest.raises(ValueError, match="decode"):
        generate_ids(model, [[1]], GenerationConfig(stop_sequences=("x",)), PAD)


@pytest.mark.gpu
def test_cuda_cached_greedy_equals_uncached():
    model = tiny_decoder(seed=0).cuda()
    prompts = random_prompts(3, seed=10)
    out = generate_ids(model, prompts, GenerationConfig(max_new_tokens=8), PAD)
    for prompt, generation in zip(prompts, out):
        assert generation.tokens == uncached_greedy(model, prompt, 8)
