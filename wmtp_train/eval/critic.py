"""The critic report: how well the value head separates correct from incorrect records, its explained
variance and that variance's ceiling, and the TD weights it gives, on labelled records."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wmtp_kernels import WeightingOptions, build_weights, compute_td_errors, last_token_index
from wmtp_train.data.dataset import LazyJsonlDataset, collate
from wmtp_train.eval.loading import run_config
from wmtp_train.eval.metrics import (
    ev_moments,
    explained_variance_from_moments,
    mutation_positions,
    prefix_oracle_explained_variance,
    roc_auc,
)
from wmtp_train.model import MTPTransformer

AUC_BY_VARIANT = "auc_vs_correct/"
"""Prefix of the critic report's per-variant AUCs (``auc_vs_correct/VARIANT``)."""


@dataclass(frozen=True)
class CriticOptions:
    """How the labelled records are tokenised and weighted: a training run's own settings by default
    (see :func:`critic_options`)."""

    weighting: WeightingOptions = WeightingOptions()
    """TD options of the weights (the run's ``[td]`` table)."""
    max_len: int = 512
    """Tokens per record (the trainer's truncation policy; the run's ``data.max_len``)."""
    batch_size: int = 8
    """Records per forward."""
    limit: int | None = None
    """Use only the first ``limit`` records."""


def critic_options(
    checkpoint: str | os.PathLike, weighting: dict[str, Any] | None = None, **overrides: Any
) -> CriticOptions:
    """The critic options of the run that wrote ``checkpoint``: its ``[td]`` options and ``data.max_len``
    from the ``config.toml`` the trainer saved (the defaults of :class:`CriticOptions` when there is none).

    Args:
        checkpoint: a run directory or its ``export/`` (see :func:`~wmtp_train.eval.loading.run_config`).
        weighting: :class:`~wmtp_kernels.WeightingOptions` fields that replace the run's.
        overrides: :class:`CriticOptions` fields that replace the run's (``max_len``, ``limit``, ...).

    Returns:
        The options.
    """
    config = run_config(checkpoint)
    options = CriticOptions() if config is None else CriticOptions(config.td, max_len=config.data.max_len)
    if weighting:
        overrides["weighting"] = dataclasses.replace(options.weighting, **weighting)
    return dataclasses.replace(options, **overrides)


@torch.no_grad()
def critic_report(
    model: MTPTransformer,
    tokenizer,
    data_path: str | os.PathLike,
    options: CriticOptions,
    out_dir: str | os.PathLike,
) -> dict[str, float]:
    """Critic quality on labelled records; writes ``critic_records.jsonl`` and ``critic_metrics.json``.

    Metrics: ``auc_last_value`` (ROC AUC of V at each record's last token for correct vs incorrect),
    ``explained_variance`` (of the reward by V over completion tokens, with the trainer's definition,
    :func:`~wmtp_train.eval.metrics.explained_variance_from_moments`),
    ``explained_variance_ceiling`` (the same for the best critic possible on these records,
    :func:`~wmtp_train.eval.metrics.prefix_oracle_explained_variance`),
    ``mean_weight_correct`` / ``mean_weight_incorrect`` (mean TD weight of the completion tokens of
    correct / incorrect records; token x_s gets weight w[s-1], docs/DESIGN.md "Weights"),
    ``mean_weight_mutated_token`` (mean TD weight of the incorrect records' mutated token: the first token
    no correct record of the same task shares, :func:`~wmtp_train.eval.metrics.mutation_positions`;
    ``n_mutated_tokens`` records have one),
    ``mean_value_correct`` / ``mean_value_incorrect`` (V at the last token), and for records that name
    their ``variant`` (the mutation kind) ``auc_vs_correct/VARIANT``: the last-token AUC of that variant's
    incorrect records against all correct ones.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        data_path: JSONL records ``{task_id, prompt, completion, is_correct, difficulty}``.
        options: tokenisation and TD options.
        out_dir: output directory (created).

    Returns:
        The metrics.
    """
    dataset = LazyJsonlDataset(data_path, tokenizer, options.max_len)
    n = len(dataset) if options.limit is None else min(options.limit, len(dataset))
    if n == 0:
        raise ValueError(f"data_path: {data_path} has no records")
    device, weighting = model.tok_embeddings.weight.device, options.weighting
    samples = [dataset[i] for i in range(n)]
    variants = [dataset.field(i, "variant") for i in range(n)]
    mutated = mutation_positions([(s.task_id, s.input_ids, s.reward > 0.5) for s in samples])
    rows, moments = [], torch.zeros(5, dtype=torch.float64)
    weight_sums = {True: [0.0, 0], False: [0.0, 0]}  # label -> [sum of weights, token count]
    for start in range(0, n, options.batch_size):
        batch = collate(samples[start : start + options.batch_size], tokenizer.pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        completion = batch["loss_mask"].to(device)
        values = model.trunk_forward(ids, mask, completion).values.squeeze(-1).float().cpu()
        rewards, completion = batch["rewards"].float(), completion.bool().cpu()
        mask = mask.cpu()
        last = last_token_index(mask)
        td = compute_td_errors(values, rewards, mask, weighting.gamma, weighting.terminal)
        weights = build_weights(td, weighting.beta, weighting.min_weight, weighting.max_weight)
        # The weight of token x_s is weights[s - 1]: shift right by one (right padding: s is the position).
        token_weights = torch.nn.functional.pad(weights[:, :-1], (1, 0))
        moments += ev_moments(values, rewards, completion)
        for b in range(values.shape[0]):
            correct = bool(rewards[b] > 0.5)
            w = token_weights[b][completion[b]]
            weight_sums[correct][0] += float(w.sum())
            weight_sums[correct][1] += int(w.numel())
            position = mutated[start + b]
            rows.append(
                {
                    "task_id": batch["task_ids"][b],
                    "variant": variants[start + b],
                    "is_correct": correct,
                    "value_last": float(values[b, last[b]]),
                    "mean_weight": float(w.mean()) if w.numel() else math.nan,
                    "n_completion_tokens": int(w.numel()),
                    "mutated_position": position,
                    "weight_mutated_token": None if position is None else float(token_weights[b, position]),
                }
            )
    labels = [r["is_correct"] for r in rows]
    last_values = [r["value_last"] for r in rows]
    mutated_weights = [r["weight_mutated_token"] for r in rows if r["weight_mutated_token"] is not None]

    def mean_where(flag: bool) -> float:
        picked = [v for v, y in zip(last_values, labels) if y == flag]
        return float(sum(picked) / len(picked)) if picked else math.nan

    metrics = {
        "n_records": len(rows),
        "n_correct": sum(labels),
        "auc_last_value": roc_auc(last_values, labels),
        "explained_variance": explained_variance_from_moments(moments),
        "explained_variance_ceiling": prefix_oracle_explained_variance(
            [(sample.input_ids, sample.n_context, sample.reward) for sample in samples]
        ),
        "mean_weight_correct": _ratio(*weight_sums[True]),
        "mean_weight_incorrect": _ratio(*weight_sums[False]),
        "mean_weight_mutated_token": _ratio(sum(mutated_weights), len(mutated_weights)),
        "n_mutated_tokens": len(mutated_weights),
        "mean_value_correct": mean_where(True),
        "mean_value_incorrect": mean_where(False),
        **_auc_by_variant(last_values, labels, variants),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "critic_records.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (out / "critic_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _auc_by_variant(last_values: list[float], labels: list[bool], variants: list[Any]) -> dict[str, float]:
    """``auc_vs_correct/VARIANT``: the last-token AUC of the incorrect records of each variant (the
    mutation kind of the synthetic and HumanEval records) against all correct records: which mistakes the
    critic sees. Empty when no incorrect record names a variant or no record is correct."""
    correct = [v for v, y in zip(last_values, labels) if y]
    incorrect: dict[str, list[float]] = {}
    for value, label, variant in zip(last_values, labels, variants):
        if not label and variant is not None:
            incorrect.setdefault(str(variant), []).append(value)
    if not correct:
        return {}
    return {
        f"{AUC_BY_VARIANT}{variant}": roc_auc(correct + values, [True] * len(correct) + [False] * len(values))
        for variant, values in sorted(incorrect.items())
    }


def _ratio(total: float, count: int) -> float:
    return total / count if count else math.nan
