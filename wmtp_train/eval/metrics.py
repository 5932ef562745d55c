"""Evaluation statistics: the unbiased pass@k estimator, a rank-based ROC AUC, the critic's explained
variance (from sums that add up over batches and ranks) and its ceiling on a set of records, and where an
incorrect record departs from the correct ones (its mutated token)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np
import torch


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem (Chen et al. 2021): ``1 - C(n - c, k) / C(n, k)``.

    Computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``, which never forms the binomials.

    Args:
        n: samples generated (>= 1).
        c: samples that passed (0..n).
        k: the k of pass@k (1..n).

    Returns:
        The probability that at least one of k samples drawn without replacement passes.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems.

    Args:
        counts: ``(n, c)`` per problem.
        k: the k.

    Returns:
        The mean (NaN for no problems).
    """
    if not counts:
        return math.nan
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve, from ranks (Mann-Whitney U); tied scores get their average rank.

    Equals ``P(score of a positive > score of a negative) + 0.5 * P(tie)``.

    Args:
        scores: one score per example (finite).
        labels: True for positives.

    Returns:
        The AUC in [0, 1]; NaN when either class is empty.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be 1-D and of equal length")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    ranks = np.empty_like(s)
    start = 0
    while start < len(s):
        end = start
        while end + 1 < len(s) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1  # average of ranks start+1 .. end+1
        start = end + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def prefix_oracle_explained_variance(records: Sequence[tuple[Sequence[int], int, float]]) -> float:
    """Explained variance of the best critic possible on these records (a ceiling for V's).

    A critic sees only the prefix ``s_t``; records that share a prefix but differ in reward (a correct
    solution and its mutant before the mutation point) cannot be told apart there. The Bayes-optimal
    critic on the records themselves predicts ``V*(s_t)`` = the mean reward of the records sharing
    ``s_t``; its ``1 - Var(R - V*) / Var(R)`` over the completion tokens (the tokens the trainer's
    explained variance counts) bounds what any critic can reach on the same records. It is a property
    of the whole set: on a subset fewer records share each prefix and the figure rises.

    Args:
        records: ``(input_ids, n_context, reward)`` per record; positions ``>= n_context`` count.

    Returns:
        The ceiling; NaN when nothing counts or the rewards have no variance.
    """
    totals: dict[int, list[float]] = {}  # prefix hash -> [sum of rewards, count]
    token_keys, token_rewards = [], []
    for input_ids, n_context, reward in records:
        prefix = 0
        for position, token in enumerate(input_ids):
            prefix = hash((prefix, int(token)))
            if position >= n_context:
                token_keys.append(prefix)
                token_rewards.append(reward)
                total = totals.setdefault(prefix, [0.0, 0])
                total[0] += reward
                total[1] += 1
    rewards = np.array(token_rewards, dtype=np.float64)
    oracle = np.array([totals[k][0] / totals[k][1] for k in token_keys], dtype=np.float64)
    if rewards.size == 0 or rewards.var() <= 1e-12:
        return math.nan
    return float(1.0 - (rewards - oracle).var() / rewards.var())


def mutation_positions(records: Sequence[tuple[Hashable, Sequence[int], bool]]) -> list[int | None]:
    """Where each incorrect record leaves every correct record of its prompt: its *mutated token*.

    For an AST mutant of a canonical solution this is the first token that differs from the canonical
    one (unless another correct completion of the prompt shares a longer prefix). It is also where the
    Bayes-optimal critic on the records (:func:`prefix_oracle_explained_variance`) drops to 0: the first
    prefix no correct record has.

    Args:
        records: ``(task_id, input_ids, is_correct)`` per record.

    Returns:
        Per record, the index in ``input_ids`` of its first token whose prefix (that token included) no
        correct record of the same task shares; None for correct records, for tasks with no correct
        record, and for a record that is a prefix of a correct one.
    """
    correct: dict[Hashable, list[Sequence[int]]] = defaultdict(list)
    for task, ids, is_correct in records:
        if is_correct:
            correct[task].append(ids)
    positions: list[int | None] = []
    for task, ids, is_correct in records:
        if is_correct or not correct[task]:
            positions.append(None)
            continue
        shared = max(_common_prefix(ids, other) for other in correct[task])
        positions.append(shared if shared < len(ids) else None)
    return positions


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def ev_moments(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sums that give the critic's explained variance of a union of batches (and ranks) once added up.

    Args:
        values: [B, T, 1] or [B, T].
        rewards: [B], broadcast over each row.
        mask: [B, T] tokens that count (the completion tokens).

    Returns:
        float64 [5] on the device of ``values``: n, sum R, sum R², sum (R - V), sum (R - V)².
    """
    v = values.detach().reshape(mask.shape).double()
    r = rewards.detach().double()[:, None].expand_as(v)
    m = mask.double()
    resid = r - v
    return torch.stack([m.sum(), (r * m).sum(), (r * r * m).sum(), (resid * m).sum(), (resid**2 * m).sum()])


def explained_variance_from_moments(moments: torch.Tensor) -> float:
    """The critic's explained variance ``1 - Var(R - V) / Var(R)`` over the tokens :func:`ev_moments` summed.

    This is the one definition the trainer (pooled over micro-batches and ranks) and the critic report
    (pooled over the evaluated records) share.

    Args:
        moments: the five sums of :func:`ev_moments` (added up over any number of batches).

    Returns:
        The explained variance; NaN when nothing counted or the rewards have no variance.
    """
    n, sr, srr, se, see = (float(x) for x in moments)
    if n == 0:
        return math.nan
    var_r = srr / n - (sr / n) ** 2
    var_e = see / n - (se / n) ** 2
    return 1.0 - var_e / var_r if var_r > 1e-12 else math.nan
