"""Design exploration of the critic: which value head can learn, on a frozen trunk, what stage 1 must learn.

Not the library. The trunk of a checkpoint is run once over the training and held-out records (frozen,
as in the default stage 1) and its states at the completion tokens are cached; value heads are then fitted
on the cache for many passes, which the trainer cannot afford on this CPU (it runs the trunk again for
every draw). Reported on the held-out records with the critic report's definitions (last-token AUC,
explained variance over the completion tokens, and its prefix-oracle ceiling), plus two diagnostics:

- ``corr2``: the squared correlation of V and R over the tokens, the explained variance V would reach
  after the best affine recalibration ``a V + b``: what ranking V carries, whatever its calibration.
  ``slope`` is that best ``a``: below 1, V swings further than the reward it predicts.
- ``ceiling_digit_blind``: the prefix-oracle ceiling when every digit of the completion is one symbol,
  i.e. of a critic that cannot tell ``x * 11`` from ``x * 12``. The base model cannot copy a constant
  from the docstring (README "Does the weighting help?"), so no critic built on it is expected to.

Heads (the same :class:`~wmtp_train.model.ValueHead` input: the raw trunk state):

- ``checkpoint``: the checkpoint's own trained value head, not fitted (e.g. a stage-1 run's, for its
  ``corr2``).
- ``mlp``: the project's value head, ``V_t = sigmoid(f(h_t))``, as stage 1 trains it (fresh).
- ``hazard``: the library's ``model.value_head = "hazard"`` (docs/DESIGN.md, "Value loss and explained
  variance"): ``V_t = sigmoid(f(h_t)) * exp(-sum_{s <= t} softplus(g(h_s)))`` over the completion tokens
  so far: a token the head finds wrong (``g`` large) lowers V at every later token. A mutant is wrong from
  its mutated token on, which a per-token head has to re-detect at each later position.
- ``attn_hazard``: the hazard head on top of one causal self-attention layer over the whole record's
  states (prompt included) plus a fresh embedding of each token's byte, so a code token can be compared
  with the docstring (a constant, a name) instead of judged from its own state alone.

    python benchmarks/prototypes/critic_heads.py --checkpoint RUN/base/export --train DATA/train.jsonl \\
        --heldout RUN/heldout_records.jsonl [--heads mlp,hazard] [--steps 4000] [--lr 2e-3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch
from torch import nn

from wmtp_train.data.dataset import LazyJsonlDataset, collate
from wmtp_train.eval.loading import load_for_evaluation
from wmtp_train.eval.metrics import prefix_oracle_explained_variance, roc_auc
from wmtp_train.model import ValueHead

DIGITS = frozenset(range(ord("0"), ord("9") + 1))  # the byte tokenizer's ids of '0'..'9'


class CachedStates:
    """Trunk states [N, T, d] of whole records (prompt and completion, zero-padded on the right), their
    token ids [N, T], the completion mask [N, T] and the rewards [N]."""

    def __init__(self, model, tokenizer, path: str, limit: int | None, max_len: int):
        dataset = LazyJsonlDataset(path, tokenizer, max_len)
        n = len(dataset) if limit is None else min(limit, len(dataset))
        self.samples = [dataset[i] for i in range(n)]
        states = []
        with torch.no_grad():
            for start in range(0, n, 16):
                batch = collate(self.samples[start : start + 16], tokenizer.pad_id)
                hidden = model.trunk_forward(batch["input_ids"], batch["attention_mask"]).hidden.float()
                for row, sample in enumerate(self.samples[start : start + 16]):
                    states.append(hidden[row, : len(sample.input_ids)])
        length = max(len(s) for s in states)
        self.hidden = torch.zeros(n, length, states[0].shape[-1])
        self.ids = torch.zeros(n, length, dtype=torch.long)
        self.mask = torch.zeros(n, length, dtype=torch.bool)
        for i, (s, sample) in enumerate(zip(states, self.samples, strict=True)):
            self.hidden[i, : len(s)] = s
            self.ids[i, : len(s)] = torch.tensor(sample.input_ids)
            self.mask[i, sample.n_context : len(s)] = True
        self.lengths = torch.tensor([len(s) for s in states])
        self.rewards = torch.tensor([s.reward for s in self.samples], dtype=torch.float32)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """States, ids and completion mask of records ``idx``, cut to their longest record."""
        t = int(self.lengths[idx].max())
        return self.hidden[idx, :t], self.ids[idx, :t], self.mask[idx, :t]

    def ceilings(self) -> dict[str, float]:
        """The prefix-oracle ceiling, and the same with the completion's digits made one symbol."""
        records = [(s.input_ids, s.n_context, s.reward) for s in self.samples]
        blind = [
            ([-1 if p >= c and t in DIGITS else t for p, t in enumerate(ids)], c, r) for ids, c, r in records
        ]
        return {
            "ceiling": prefix_oracle_explained_variance(records),
            "ceiling_digit_blind": prefix_oracle_explained_variance(blind),
        }


class CachedHead(nn.Module):
    """A :class:`ValueHead` on cached states: ``(hidden [N, T, d], ids [N, T], completion mask [N, T]) ->
    V [N, T]``."""

    def __init__(self, value_head: ValueHead):
        super().__init__()
        self.value = value_head

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.value(hidden, mask).squeeze(-1)


class AttentionHazardHead(nn.Module):
    """``attn_hazard``: a causal self-attention layer over the record's states and byte embeddings, then
    the library's hazard head on its output (the module docstring says why)."""

    def __init__(self, args, heads: int = 4, byte_dim: int = 32):
        super().__init__()
        d = args.dim
        self.norm = nn.LayerNorm(d)
        self.bytes = nn.Embedding(args.vocab_size, byte_dim) if byte_dim else None
        self.inp = nn.Linear(d + byte_dim, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.value = ValueHead(dataclasses.replace(args, value_head="hazard"))
        self.value.init_weights()

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(hidden)
        x = self.inp(x if self.bytes is None else torch.cat([x, self.bytes(ids)], dim=-1))
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        y, _ = self.attn(x, x, x, attn_mask=causal, need_weights=False)
        return self.value(hidden + y, mask).squeeze(-1)


def report(head: nn.Module, data: CachedStates, batch: int = 128) -> dict[str, float]:
    """Last-token AUC, and explained variance, corr2 and slope over the completion tokens."""
    vs, rs, last = [], [], []
    with torch.no_grad():
        for start in range(0, len(data.rewards), batch):
            idx = torch.arange(start, min(start + batch, len(data.rewards)))
            hidden, ids, mask = data.batch(idx)
            values = head(hidden, ids, mask)
            vs.append(values[mask])
            rs.append(data.rewards[idx, None].expand_as(values)[mask])
            last += values[torch.arange(len(idx)), data.lengths[idx] - 1].tolist()
    v, r = torch.cat(vs).double().numpy(), torch.cat(rs).double().numpy()
    return {
        "auc_last_value": roc_auc(last, (data.rewards > 0.5).tolist()),
        "explained_variance": float(1 - np.var(r - v) / np.var(r)),
        "corr2": float(np.corrcoef(v, r)[0, 1] ** 2),
        "slope": float(np.cov(v, r)[0, 1] / np.var(v, ddof=1)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="the trunk (and value-head shape) to probe")
    p.add_argument("--train", required=True)
    p.add_argument("--heldout", required=True)
    p.add_argument("--train-records", type=int, default=None, help="first N training records (default all)")
    p.add_argument("--max-len", type=int, default=384)
    p.add_argument("--heads", default="mlp,hazard", help="checkpoint, mlp, hazard, attn_hazard")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--byte-dim", type=int, default=32, help="attn_hazard's byte embedding width (0: none)")
    p.add_argument("--batch", type=int, default=64, help="records per step, drawn uniformly")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--every", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    model, tokenizer, _ = load_for_evaluation(args.checkpoint)
    train = CachedStates(model, tokenizer, args.train, args.train_records, args.max_len)
    heldout = CachedStates(model, tokenizer, args.heldout, None, args.max_len)
    print(json.dumps({"records": [len(train.rewards), len(heldout.rewards)], **heldout.ceilings()}))
    print(f"trunk states cached in {time.monotonic() - start:.0f} s", flush=True)
    for name in args.heads.split(","):
        if name == "checkpoint":
            scores = report(CachedHead(model.value_head), heldout)
            row = {f"heldout_{k}": round(v, 4) for k, v in scores.items()}
            print(json.dumps({"head": name, **row}), flush=True)
            continue
        torch.manual_seed(0)
        if name == "attn_hazard":
            head = AttentionHazardHead(model.args, byte_dim=args.byte_dim)
        else:
            head = CachedHead(ValueHead(dataclasses.replace(model.args, value_head=name)))
            head.value.init_weights()
        optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
        draws = torch.Generator().manual_seed(0)
        start = time.monotonic()
        for step in range(1, args.steps + 1):
            idx = torch.randint(0, len(train.rewards), (args.batch,), generator=draws)
            hidden, ids, mask = train.batch(idx)
            values = head(hidden, ids, mask)
            loss = ((values - train.rewards[idx, None]) ** 2 * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % args.every == 0 or step == args.steps:
                row = {"head": name, "step": step, "s": round(time.monotonic() - start)}
                row |= {f"heldout_{k}": round(v, 4) for k, v in report(head, heldout).items()}
                row |= {f"train_{k}": round(v, 4) for k, v in report(head, train).items()}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
