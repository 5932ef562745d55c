"""Batched text generation for the MTP model with a KV cache: greedy, temperature and top-p sampling.

Prompts of different lengths are left-padded into one batch. The cache keeps, per attention layer, the
rotated keys and the values of every slot written so far, plus a per-row mask of which slots hold real
tokens; RoPE positions count real tokens only, so a row's states do not depend on its padding (the
model's own convention, ``positions_from_mask``). A slot can be dropped after the fact by clearing its
mask bit, which is how :mod:`wmtp_train.inference.speculative` discards rejected draft tokens without moving
memory.

The cached forward goes through the model's own blocks (``TransformerBlock.forward(..., kv_cache=...)``),
its rotary helpers and its shared output head, so it is the same computation as ``full_forward``.

Generation runs on whatever device the model is on (CPU or CUDA) under ``torch.inference_mode``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from wmtp_train.model.mtp import MTPTransformer, positions_from_mask, rotary_tables

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


class _LayerCache:
    """The view of one attention layer on a :class:`KVCache` (what ``Attention.forward`` calls)."""

    def __init__(self, owner: KVCache, layer: int):
        self.owner = owner
        self.layer = layer

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values at the pending slots and return all slots up to them."""
        return self.owner.write(self.layer, k, v)


class KVCache:
    """Keys and values of every cached slot, for ``n_layers`` attention layers, growing on demand.

    Args:
        n_layers: attention layers cached (trunk blocks + the head blocks that run).
        batch_size: rows.
        n_kv_heads: key/value heads per layer.
        head_dim: attention head width.
        device: where the buffers live.
        dtype: dtype of keys and values (the model's).
        capacity: initial number of slots.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        capacity: int = 256,
    ):
        shape = (batch_size, capacity, n_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.slot_mask = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch_size, dtype=torch.long, device=device)
        """Real tokens cached per row (the RoPE position of the row's next token)."""
        self.length = 0
        """Slots in use (real or not)."""
        self._pending = 0

    @property
    def capacity(self) -> int:
        """Allocated slots."""
        return self.slot_mask.shape[1]

    def layer(self, index: int) -> _LayerCache:
        """The cache of one layer, to pass as ``kv_cache`` to a block."""
        return _LayerCache(self, index)

    def _grow(self, needed: int) -> None:
        new_capacity = max(needed, 2 * self.capacity)

        def grown(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((t.shape[0], new_capacity, *t.shape[2:]))
            out[:, : self.length] = t[:, : self.length]
            return out

        self.keys = [grown(t) for t in self.keys]
        self.values = [grown(t) for t in self.values]
        self.slot_mask = grown(self.slot_mask)

    def begin(self, new_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve slots for a step of S new tokens.

        Args:
            new_mask: [B, S] bool, True for real new tokens.

        Returns:
            ``(positions [B, S], attention mask [B, 1, S, length + S])``: causal over slots, real
            keys only, and every query sees its own slot (so a padded query never has an empty row).
        """
        steps = new_mask.shape[1]
        end = self.length + steps
        if end > self.capacity:
            self._grow(end)
        self.slot_mask[:, self.length : end] = new_mask
        self._pending = steps
        positions = positions_from_mask(new_mask) + self.n_real.unsqueeze(1)
        query_slot = torch.arange(self.length, end, device=new_mask.device).unsqueeze(1)
        key_slot = torch.arange(end, device=new_mask.device).unsqueeze(0)
        causal = key_slot <= query_slot  # [S, end]
        own = key_slot == query_slot
        allowed = causal & (self.slot_mask[:, None, :end] | own)  # [B, S, end]
        return positions, allowed.unsqueeze(1)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values at the reserved slots.

        Args:
            layer: layer index.
            k: [B, S, n_kv_heads, head_dim] rotated keys.
            v: [B, S, n_kv_heads, head_dim] values.

        Returns:
            Keys and values of slots ``0 .. length + S``.
        """
        if k.shape[1] != self._pending:
            raise ValueError(f"k has {k.shape[1]} new slots, the step reserved {self._pending}")
        end = self.length + self._pending
        self.keys[layer][:, self.length : end] = k
        self.values[layer][:, self.length : end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def commit(self) -> None:
        """Finish the step: the reserved slots become cached, their real tokens counted."""
        end = self.length + self._pending
        self.n_real += self.slot_mask[:, self.length : end].sum(1)
        self.length = end
        self._pending = 0

    def drop(self, row: int, start: int, end: int) -> None:
        """Forget slots ``start .. end`` of one row (e.g. rejected drafts): they are masked out and no
        longer count as positions.

        Args:
            row: batch row.
            start: first slot (absolute index).
            end: one past the last slot.
        """
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"slots [{start}, {end}) outside the cached [0, {self.length})")
        self.n_real[row] -= self.slot_mask[row, start:end].sum()
        self.slot_mask[row, start:end] = False


def new_cache(model: MTPTransformer, batch_size: int, n_heads: int, capacity: int) -> KVCache:
    """A cache for the trunk and the first ``n_heads`` head blocks of ``model``.

    Args:
        model: the model.
        batch_size: rows.
        n_heads: head blocks that will run (1 for plain decoding, H for speculative).
        capacity: initial slots (it grows when needed).

    Returns:
        An empty cache on the model's device and dtype.
    """
    args = model.args
    weight = model.tok_embeddings.weight
    return KVCache(
        n_layers=args.n_trunk_layers + n_heads,
        batch_size=batch_size,
        n_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        device=weight.device,
        dtype=weight.dtype,
        capacity=capacity,
    )


def cached_forward(
    model: MTPTransformer,
    cache: KVCache,
    tokens: torch.Tensor,
    new_mask: torch.Tensor,
    n_heads: int,
    last_only: bool = False,
) -> torch.Tensor:
    """Run S new tokens through the trunk and the first ``n_heads`` heads, reading and filling the cache.

    Args:
        model: the model.
        cache: a cache from :func:`new_cache` with room for ``n_heads`` head blocks.
        tokens: [B, S] token ids.
        new_mask: [B, S] bool, True for real tokens (False: left padding).
        n_heads: head blocks to run.
        last_only: return the logits of the last new slot only.

    Returns:
        [B, S or 1, n_heads, V] float32 logits.
    """
    n_cached_layers = len(cache.keys)
    n_trunk = model.args.n_trunk_layers
    if n_trunk + n_heads > n_cached_layers:
        raise ValueError(f"cache holds {n_cached_layers} layers, need {n_trunk} trunk + {n_heads} heads")
    if tokens.shape != new_mask.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and new_mask {tuple(new_mask.shape)} differ")
    positions, mask = cache.begin(new_mask)
    rotary = rotary_tables(positions, model.args.head_dim, model.args.rope_theta)
    h = model.tok_embeddings(tokens)
    for i, block in enumerate(model.layers[:-1]):
        h = block(h, rotary, mask, kv_cache=cache.layer(i))
    heads = [
        block(h, rotary, mask, kv_cache=cache.layer(n_trunk + k))
        for k, block in enumerate(model.head_blocks[:n_heads])
    ]
    cache.commit()
    hidden = torch.stack(heads, dim=2)
    if last_only:
        hidden = hidden[:, -1:]
    return model.head(hidden, return_logits=True).logits


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
    """Tokenise prompts the way the trainer does (``bos + prompt``, see ``wmtp_train.data.dataset``).

    Args:
        tokenizer: a tokenizer of ``wmtp_train.data.tokenizer``.
        prompts: prompt strings.

    Returns:
        Token id lists.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, got a single str")
    return [tokenizer.encode(p, bos=True) for p in prompts]


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
