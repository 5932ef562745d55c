import math

import pytest
import torch

from wmtp_kernels.reference import explained_variance, weighted_mtp_cross_entropy
from wmtp_train.eval.metrics import ev_moments, explained_variance_from_moments
from wmtp_train.train.lr_schedule import lr_factor
from wmtp_train.train.metrics import prediction_counts
from wmtp_train.train.weighting import excess_loss_scores, rho1_weights


def _batch(batch=3, seq=9, heads=4, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1, -2:] = 0  # right padding
    labels[:, :2] = -100  # prompt
    labels[mask == 0] = -100
    logits = torch.randn(batch, seq, heads, vocab, generator=g)
    return logits, labels, mask


def test_prediction_counts_match_reference_per_head_counts():
    _, labels, mask = _batch()
    expected = []
    for k in range(1, 5):
        valid = (labels[:, k:] != -100) & mask[:, :-k].bool() & mask[:, k:].bool()
        expected.append(int(valid.sum()))
    assert prediction_counts(labels, mask, 4).tolist() == expected


def test_sum_over_count_equals_spec_mean_when_heads_have_equal_counts():
    logits, labels, mask = _batch()
    labels[:, :4] = -100  # a prompt of H tokens: every head has the same number of valid predictions
    ones = torch.ones(labels.shape)
    mean = weighted_mtp_cross_entropy(logits, labels, mask, weights=ones, reduction="mean")
    total = weighted_mtp_cross_entropy(logits, labels, mask, weights=ones, reduction="sum")
    normalised = total.double() / prediction_counts(labels, mask, 4).sum()
    assert normalised.item() == pytest.approx(mean.item(), rel=1e-6)


def test_excess_scores_follow_the_weight_index_convention():
    # ce[b, t, k-1] is head k's prediction (at position t) of token t + k, i.e. weight index t + k - 1.
    batch, seq, heads = 1, 6, 2
    labels = torch.arange(seq).view(1, seq)
    mask = torch.ones(1, seq, dtype=torch.int64)
    ce = torch.zeros(batch, seq, heads)
    ce[0, 1, 0] = 3.0  # head 1 at t=1 predicts token 2 -> weight index 1
    ce[0, 1, 1] = 5.0  # head 2 at t=1 predicts token 3 -> weight index 2
    ref = torch.zeros_like(ce)
    next_only = excess_loss_scores(ce, ref, labels, mask, score="next_token")
    assert next_only[0].tolist() == [0, 3.0, 0, 0, 0, 0]
    mean = excess_loss_scores(ce, ref, labels, mask, score="mean_heads")
    # index 1 (token 2): head 1 (3.0) and head 2 from t=0 (0.0) -> 1.5
    # index 2 (token 3): head 1 from t=2 (0.0) and head 2 from t=1 (5.0) -> 2.5
    assert mean[0].tolist() == [0, 1.5, 2.5, 0, 0, 0]
    # token 3 not trained: no head's prediction of it counts (head 2 at t=1 included), index 2 scores 0
    labels[0, 3] = -100
    mean = excess_loss_scores(ce, ref, labels, mask, score="mean_heads")
    assert mean[0].tolist() == [0, 1.5, 0, 0, 0, 0]


def test_rho1_weights_select_top_fraction_and_normalise():
    _, labels, mask = _batch(seed=1)
    scores = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3))
    from wmtp_kernels import applied_weight_mask

    applied = applied_weight_mask(labels, mask, -100)
    w = rho1_weights(scores, labels, mask, top_k=0.6)
    n = int(applied.sum())
    selected = (w > 0) & applied
    assert int(selected.sum()) == math.ceil(0.6 * n)
    assert torch.allclose(w[applied].mean(), torch.tensor(1.0))
    # every selected token scores at least as high as every unselected one
    assert scores[selected].min() >= scores[applied & ~selected].max()
    assert torch.all(w[~applied] == 1)
    soft = rho1_weights(scores, labels, mask, top_k=0.6, unselected_weight=0.5)
    assert torch.all(soft[applied & ~selected] > 0)
    assert torch.allclose(soft[applied].mean(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="top_k"):
        rho1_weights(scores, labels, mask, top_k=0.0)


def test_ev_moments_union_matches_reference():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(4, 7, 1, generator=g)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    mask = (torch.rand(4, 7, generator=g) > 0.3).long()
    expected = explained_variance(values, rewards, mask)
    split = ev_moments(values[:2], rewards[:2], mask[:2]) + ev_moments(values[2:], rewards[2:], mask[2:])
    assert explained_variance_from_moments(split) == pytest.approx(float(expected), abs=1e-6)
    assert math.isnan(explained_variance_from_moments(ev_moments(values, torch.ones(4), mask)))


def test_lr_schedule_shape():
    factors = [lr_factor(s, 10, 100, 0.1) for s in range(120)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[100] == pytest.approx(0.1) and factors[119] == pytest.approx(0.1)
