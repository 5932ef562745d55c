import pytest
import torch
from decoding_models import (
    copy_head_one_into_extra_heads,
    pattern_trained_decoder,
    random_prompts,
    single_thread,
    tiny_decoder,
)

from wmtp_train.data.tokenizer import ByteTokenizer
from wmtp_train.inference.generation import DecodeStats, GenerationConfig, generate_ids
from wmtp_train.inference.speculative import accepted_drafts, speculative_generate, speculative_generate_ids

PAD = ByteTokenizer.pad_id
DECODE = ByteTokenizer().decode


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def random_model():
    return tiny_decoder(seed=0)


@pytest.fixture(scope="module")
def agreeing_model():
    return copy_head_one_into_extra_heads(tiny_decoder(seed=2))


@pytest.fixture(scope="module")
def pattern_model():
    with single_thread():
        return pattern_trained_decoder()


def assert_same_as_plain(model, prompts, config, decode=None) -> DecodeStats:
    stats = DecodeStats()
    plain = generate_ids(model, prompts, config, PAD, decode)
    fast = speculative_generate_ids(model, prompts, config, PAD, decode, stats=stats)
    for i, (p, s) in enumerate(zip(plain, fast)):
        assert s.tokens == p.tokens, f"prompt {i}: speculative {s.tokens} != plain {p.tokens}"
        assert s.text == p.text
        assert s.finish_reason == p.finish_reason
    assert stats.generated_tokens == sum(len(g.tokens) for g in plain)
    return stats


def test_accepted_drafts_prefix_rule():
    verified = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 2, 3, 4], [1, 9, 3, 4]])
    drafts = torch.tensor([[1, 2, 3], [1, 7, 3], [6, 2, 3], [1, 2, 3]])
    # Row 1: second draft wrong, the third's match does not count; row 3: stops after the first.
    assert accepted_drafts(verified, drafts).tolist() == [3, 1, 0, 1]
    with pytest.raises(ValueError, match="one column more"):
        accepted_drafts(verified, drafts[:, :2])


@pytest.mark.parametrize("model_name", ["random_model", "agreeing_model", "pattern_model"])
def test_identical_to_plain_greedy_on_many_prompts(model_name, request):
    model = request.getfixturevalue(model_name)
    prompts = random_prompts(20, seed=11, min_len=1, max_len=16)
    lengths = [3, 9, 17, 25]
    stats = DecodeStats()
    for i, max_new in enumerate(lengths):
        batch = prompts[i * 5 : (i + 1) * 5]
        part = assert_same_as_plain(model, batch, GenerationConfig(max_new_tokens=max_new))
        for name in ("drafted_tokens", "accepted_tokens", "generated_tokens", "row_forwards"):
            setattr(stats, name, getattr(stats, name) + getattr(part, name))
    # One by one (no padding) too.
    for prompt in prompts[:4]:
        assert_same_as_plain(model, [prompt], GenerationConfig(max_new_tokens=13))
    if model_name == "pattern_model":
        assert stats.acceptance_rate > 0.5
        assert stats.tokens_per_forward > 2.0


def test_identical_with_stop_sequences_and_stop_tokens(pattern_model, agreeing_model):
    prompts = [
        [ByteTokenizer.bos_id, *b"abcdefg"],
        [ByteTokenizer.bos_id, *b"cde"],
        *random_prompts(6, seed=12),
    ]
    for model in (pattern_model, agreeing_model):
        free = generate_ids(model, prompts, GenerationConfig(max_new_tokens=30), PAD, DECODE)
        stop_text = free[0].text[9:11]
        stop_id = free[1].tokens[4]
        config = GenerationConfig(max_new_tokens=30, stop_sequences=(stop_text,), stop_token_ids=(stop_id,))
        assert_same_as_plain(model, prompts, config, DECODE)
        # The stops really cut rows short (in the middle of an accepted block for the pattern model).
        assert any(g.finish_reason != "length" for g in generate_ids(model, prompts, config, PAD, DECODE))


def test_agreeing_heads_accept_repetitions(agreeing_model):
    """Extra heads that copy head 1 draft 'the same token again': accepted exactly on repeats."""
    prompts = random_prompts(8, seed=13)
    config = GenerationConfig(max_new_tokens=40)
    stats = assert_same_as_plain(agreeing_model, prompts, config)
    plain = generate_ids(agreeing_model, prompts, config, PAD)
    repeats = sum(a == b for g in plain for a, b in zip(g.tokens, g.tokens[1:]))
    assert (stats.accepted_tokens > 0) == (repeats > 0)


def test_pattern_model_continues_the_cycle_in_few_forwards(pattern_model):
    prompt = [ByteTokenizer.bos_id, *b"abcdefgabc"]
    stats = DecodeStats()
    [out] = speculative_generate_ids(
        pattern_model, [prompt], GenerationConfig(max_new_tokens=28), PAD, stats=stats
    )
    assert bytes(out.tokens) == b"defgabc" * 4
    assert stats.forwards < 28 / 2


def test_fewer_draft_heads_and_single_head_model(pattern_model):
    prompts = random_prompts(4, seed=14)
    config = GenerationConfig(max_new_tokens=12)
    plain = generate_ids(pattern_model, prompts, config, PAD)
    for n_draft in (0, 1, 2):
        stats = DecodeStats()
        out = speculative_generate_ids(
            pattern_model, prompts, config, PAD, stats=stats, n_draft_heads=n_draft
        )
        assert [g.tokens for g in out] == [g.tokens for g in plain]
        if n_draft == 0:
            assert stats.tokens_per_forward == 1.0
    single = tiny_decoder(seed=3, n_future_tokens=1, n_layers=3)
    assert_same_as_plain(single, prompts, config)


def test_text_wrapper_and_errors(pattern_model):
    tokenizer = ByteTokenizer()
    config = GenerationConfig(max_new_tokens=10)
    [out] = speculative_generate(pattern_model, tokenizer, ["abc"], config)
    assert out.text == tokenizer.decode(out.tokens)
    with pytest.raises(ValueError, match="greedy"):
        speculative_generate_ids(pattern_model, [[1]], GenerationConfig(temperature=1.0), PAD)
    with pytest.raises(ValueError, match="n_draft_heads"):
        speculative_generate_ids(pattern_model, [[1]], config, PAD, n_draft_heads=4)


@pytest.mark.gpu
def test_cuda_identical_to_plain():
    model = pattern_trained_decoder().cuda()
    assert_same_as_plain(model, random_prompts(6, seed=15), GenerationConfig(max_new_tokens=20))
