"""Batched text generation for the MTP model with a KV cache (:mod:`wmtp_train.inference.kv_cache`):
greedy, temperature and top-p sampling.

Prompts of different lengths are left-padded into one batch; the cache keeps each row's states
independent of its padding. Generation runs on whatever device the model is on (CPU or CUDA) under
``torch.inference_mode``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from wmtp_train.data.dataset import encode_prompt
from wmtp_train.inference.kv_cache import cached_forward, new_cache
from wmtp_train.model import MTPTransformer

FINISH_REASONS = ("eos", "stop", "length")


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens per prompt (the stop token counts)."""
    temperature: float = 0.0
    """0 means greedy; > 0 samples from ``softmax(logits / temperature)``."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens whose cumulative probability first
    reaches ``top_p`` (the most likely token is always kept)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a row (e.g. the tokenizer's eos); the id is kept in ``tokens``, not in text."""
    stop_sequences: tuple[str, ...] = ()
    """Strings that end a row once the decoded completion contains one; the text is cut before it."""
    seed: int | None = None
    """Seed of the sampling generator (None: unseeded)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not s for s in self.stop_sequences):
            raise ValueError(f"stop_sequences must be non-empty strings, got {self.stop_sequences!r}")


@dataclass
class Generation:
    """One generated completion."""

    tokens: list[int]
    """Generated ids, including the stop token / the token that completed a stop sequence."""
    text: str
    """Decoded completion, cut before the first stop sequence (empty without a decoder)."""
    finish_reason: str
    """``"eos"`` (a stop token), ``"stop"`` (a stop sequence) or ``"length"`` (max_new_tokens)."""


@dataclass
class DecodeStats:
    """Counters of one decoding call (batched: summed over rows where it says so)."""

    forwards: int = 0
    """Model forward passes (prefill included)."""
    generated_tokens: int = 0
    """Tokens emitted, summed over rows."""
    drafted_tokens: int = 0
    """Speculative only: draft tokens proposed to live rows, summed over rows."""
    accepted_tokens: int = 0
    """Speculative only: draft tokens accepted by the next-token head, summed over rows."""
    row_forwards: int = 0
    """Forward passes summed over live rows (a row stops counting once finished)."""

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens a row gains per forward pass it takes part in (1.0 for plain decoding)."""
        return self.generated_tokens / max(self.row_forwards, 1)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of proposed draft tokens that were accepted."""
        return self.accepted_tokens / max(self.drafted_tokens, 1)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into one batch.

    Args:
        prompts: token id lists, each non-empty.
        pad_id: filler id (masked out, any valid id works).
        device: where the tensors go.

    Returns:
        ``(ids [B, T] int64, mask [B, T] bool)``.
    """
    if not prompts:
        raise ValueError("prompts is empty")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty} are empty (a prompt needs at least one token, e.g. bos)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = True
    return ids.to(device), mask.to(device)


class RowStopper:
    """Accumulates one row's tokens and decides when the row is finished.

    Args:
        config: the generation config (max_new_tokens, stop ids, stop sequences).
        decode: ids -> text; required when ``config.stop_sequences`` is set.
    """

    def __init__(self, config: GenerationConfig, decode: Callable[[list[int]], str] | None):
        if config.stop_sequences and decode is None:
            raise ValueError("stop_sequences need a decode function (pass a tokenizer)")
        self.config = config
        self.decode = decode
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        """Whether the row is finished."""
        return self.finish_reason is not None

    def push(self, token: int) -> bool:
        """Append a token (ignored once done).

        Args:
            token: the next generated id.

        Returns:
            Whether the row is finished now.
        """
        if self.done:
            return True
        self.tokens.append(int(token))
        if int(token) in self.config.stop_token_ids:
            self.finish_reason = "eos"
        elif self.config.stop_sequences and self._stop_index(self.decode(self.tokens)) is not None:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.config.max_new_tokens:
            self.finish_reason = "length"
        return self.done

    def _stop_index(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.config.stop_sequences) if i >= 0]
        return min(hits) if hits else None

    def result(self) -> Generation:
        """The finished (or truncated) generation."""
        if self.decode is None:
            return Generation(list(self.tokens), "", self.finish_reason or "length")
        ids = [t for t in self.tokens if t not in self.config.stop_token_ids]
        text = self.decode(ids)
        cut = self._stop_index(text) if self.config.stop_sequences else None
        return Generation(
            list(self.tokens), text if cut is None else text[:cut], self.finish_reason or "length"
        )


def select_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Greedy (temperature 0) or nucleus sampling over the last dimension.

    Args:
        logits: [B, V] float logits.
        temperature: 0 for argmax, else the softmax temperature.
        top_p: nucleus mass in (0, 1].
        generator: random generator for sampling (on the logits' device).

    Returns:
        [B] int64 token ids.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    # Keep a token while the mass before it is below top_p: the top token always survives.
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def check_room(model: MTPTransformer, prompts: Sequence[Sequence[int]], extra: int) -> None:
    """Raise ValueError when the longest prompt plus ``extra`` tokens exceeds ``max_seq_len``.

    Args:
        model: the model.
        prompts: token id lists.
        extra: tokens that will be appended (generated and in-flight drafts).
    """
    longest = max(len(p) for p in prompts)
    if longest + extra > model.args.max_seq_len:
        raise ValueError(
            f"longest prompt ({longest} tokens) + {extra} generated exceeds max_seq_len "
            f"{model.args.max_seq_len}; shorten the prompt or max_new_tokens"
        )


def _sampling_generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    if config.temperature == 0 or config.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    return generator


@torch.inference_mode()
def generate_ids(
    model: MTPTransformer,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    pad_id: int,
    decode: Callable[[list[int]], str] | None = None,
    stats: DecodeStats | None = None,
) -> list[Generation]:
    """Decode a batch of token prompts with the next-token head and a KV cache.

    Args:
        model: the model (any device; put it in eval mode).
        prompts: token id lists (bos included when the model was trained with it).
        config: decoding options.
        pad_id: id used for left padding.
        decode: ids -> text, for stop sequences and ``Generation.text``.
        stats: counters to fill (forwards, tokens).

    Returns:
        One :class:`Generation` per prompt, in order.
    """
    check_room(model, prompts, config.max_new_tokens)
    device = model.tok_embeddings.weight.device
    ids, mask = left_pad(prompts, pad_id, device)
    stats = stats if stats is not None else DecodeStats()
    generator = _sampling_generator(config, device)
    rows = [RowStopper(config, decode) for _ in prompts]
    cache = new_cache(model, len(prompts), 1, ids.shape[1] + config.max_new_tokens)
    logits = cached_forward(model, cache, ids, mask, n_heads=1, last_only=True)
    while True:
        stats.forwards += 1
        stats.row_forwards += sum(not r.done for r in rows)
        next_tokens = select_tokens(logits[:, -1, 0], config.temperature, config.top_p, generator)
        for row, token in zip(rows, next_tokens.tolist()):
            if not row.done:
                row.push(token)
                stats.generated_tokens += 1
        if all(r.done for r in rows):
            break
        step = next_tokens.unsqueeze(1)
        logits = cached_forward(model, cache, step, torch.ones_like(step, dtype=torch.bool), n_heads=1)
    return [r.result() for r in rows]


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Tokenise prompts the way the trainer does (:func:`~wmtp_train.data.dataset.encode_prompt`).

    Args:
        tokenizer: a tokenizer of ``wmtp_train.data.tokenizer``.
        prompts: prompt strings.

    Returns:
        Token id lists.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, got a single str")
    return [encode_prompt(tokenizer, p)[0] for p in prompts]


def generate(
    model: MTPTransformer,
    tokenizer,
    prompts: Sequence[str],
    config: GenerationConfig,
    stats: DecodeStats | None = None,
) -> list[Generation]:
    """Generate completions for text prompts (eos always stops a row).

    Args:
        model: the model.
        tokenizer: its tokenizer (``encode``, ``decode``, ``pad_id``, ``eos_id``).
        prompts: prompt strings.
        config: decoding options.
        stats: counters to fill.

    Returns:
        One :class:`Generation` per prompt.
    """
    config = with_eos(config, tokenizer.eos_id)
    return generate_ids(
        model, encode_prompts(tokenizer, prompts), config, tokenizer.pad_id, tokenizer.decode, stats
    )


def with_eos(config: GenerationConfig, eos_id: int) -> GenerationConfig:
    """``config`` with ``eos_id`` among its stop tokens.

    Args:
        config: decoding options.
        eos_id: the tokenizer's end-of-sequence id.

    Returns:
        The (possibly) extended config.
    """
    if eos_id in config.stop_token_ids:
        return config
    return dataclasses.replace(config, stop_token_ids=(*config.stop_token_ids, eos_id))
