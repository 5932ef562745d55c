"""The decoding KV cache of the MTP model and the forward pass that reads and fills it.

The cache keeps, per attention layer, the rotated keys and the values of every slot written so far, plus
a per-row mask of which slots hold real tokens; RoPE positions count real tokens only, so a row's states
do not depend on its padding (the model's own convention, ``positions_from_mask``). A slot can be dropped
after the fact by clearing its mask bit, which is how :mod:`wmtp_train.inference.speculative` discards
rejected draft tokens without moving memory.

The cached forward goes through the model's own blocks (``TransformerBlock.forward(..., kv_cache=...)``),
its rotary helpers and its shared output head, so it is the same computation as ``full_forward``.
"""

from __future__ import annotations

import torch

from wmtp_train.model import MTPTransformer
from wmtp_train.model.layers import positions_from_mask, rotary_tables


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
