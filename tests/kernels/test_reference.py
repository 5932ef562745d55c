"""The reference math (docs/DESIGN.md): worked examples, brute-force loops, properties."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from wmtp_kernels import reference as ref

# ---------------------------------------------------------------- brute-force definitions of the math


def brute_td(values, rewards, mask, gamma, terminal):
    """Per-(b, t) loop over the definition's words, independent of the vectorised reference."""
    B, T = values.shape
    td = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        real = [t for t in range(T) if mask[b, t]]
        if not real:
            continue
        last = real[-1]
        for t in real:
            if t < last and mask[b, t + 1]:
                td[b, t] = gamma * values[b, t + 1] - values[b, t]
        if terminal == "last_state":
            td[b, last] = rewards[b] - values[b, last]
        else:
            td[b, last] = 0.0
            if last >= 1 and mask[b, last - 1]:
                td[b, last - 1] = rewards[b] - values[b, last - 1]
    return td


def brute_mtp(logits, labels, mask, weights, ignore_index, reduction):
    """Per-(b, t, k) loop: head k at t predicts labels[t+k] with weight weights[t+k-1]."""
    B, T, H, V = logits.shape
    per = torch.zeros(B, T, H, dtype=torch.float64)
    numer = [0.0] * H
    count = [0] * H
    for b in range(B):
        for t in range(T):
            for k in range(1, H + 1):
                if t + k >= T or not (mask[b, t] and mask[b, t + k]) or labels[b, t + k] == ignore_index:
                    continue
                lp = torch.log_softmax(logits[b, t, k - 1].double(), -1)[labels[b, t + k]]
                contribution = -lp * weights[b, t + k - 1]
                per[b, t, k - 1] = contribution
                numer[k - 1] += contribution.item()
                count[k - 1] += 1
    if reduction == "none":
        return per
    if reduction == "sum":
        return torch.tensor(sum(numer), dtype=torch.float64)
    return torch.tensor(sum(n / max(c, 1) for n, c in zip(numer, count)) / H, dtype=torch.float64)


def padded_mask(B, T, lengths, side):
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, T - n :] = 1
    return mask


# ---------------------------------------------------------------- worked examples


def test_td_worked_example_last_state():
    td = ref.compute_td_errors(torch.tensor([[[0.5], [0.7], [0.9]]]), torch.tensor([1.0]), torch.ones(1, 3))
    torch.testing.assert_close(td, torch.tensor([[0.2, 0.2, 0.1]]))


def test_td_worked_example_last_transition():
    td = ref.compute_td_errors(
        torch.tensor([[0.5, 0.7, 0.9]]), torch.tensor([1.0]), torch.ones(1, 3), terminal="last_transition"
    )
    torch.testing.assert_close(td, torch.tensor([[0.2, 0.3, 0.0]]))


def test_weights_worked_example():
    w = ref.build_weights(torch.tensor([0.2, -0.5, 0.1]))
    torch.testing.assert_close(w, torch.tensor([1.2488, 0.5738, 1.1175]), atol=1e-4, rtol=0)


def test_weights_clip_at_both_ends():
    w = ref.build_weights(torch.tensor([-10.0, 10.0, 0.0]), beta=0.9, min_weight=0.1, max_weight=5.0)
    assert w.tolist() == pytest.approx([0.1, 5.0, 1.0])


# ---------------------------------------------------------------- TD errors


@pytest.mark.parametrize("terminal", ["last_state", "last_transition"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_td_matches_brute_force(terminal, side, gamma):
    B, T = 5, 7
    lengths = [7, 4, 1, 0, 2]
    mask = padded_mask(B, T, lengths, side)
    values = torch.rand(B, T, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    td = ref.compute_td_errors(values, rewards, mask, gamma, terminal)
    torch.testing.assert_close(td, brute_td(values, rewards, mask, gamma, terminal))
    assert (td[mask == 0] == 0).all()


def test_td_left_and_right_padding_agree_on_real_tokens():
    values = torch.rand(1, 4)
    right = ref.compute_td_errors(F.pad(values, (0, 3)), torch.ones(1), padded_mask(1, 7, [4], "right"))
    left = ref.compute_td_errors(F.pad(values, (3, 0)), torch.ones(1), padded_mask(1, 7, [4], "left"))
    torch.testing.assert_close(right[:, :4], left[:, 3:])


def test_td_mask_with_hole_uses_real_neighbours_only():
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    values = torch.rand(1, 5, dtype=torch.float64)
    td = ref.compute_td_errors(values, torch.ones(1, dtype=torch.float64), mask)
    torch.testing.assert_close(td, brute_td(values, torch.ones(1), mask, 1.0, "last_state"))


def test_last_token_index_both_sides():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    assert ref.last_token_index(mask).tolist() == [2, 3, -1]


# ---------------------------------------------------------------- H-offset weighted MTP cross-entropy


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("T,H", [(6, 3), (3, 4), (4, 4), (1, 2)])
def test_mtp_ce_matches_brute_force(reduction, side, T, H):
    B, V = 3, 11
    logits = torch.randn(B, T, H, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    labels[0, 1 % T] = -100
    mask = padded_mask(B, T, [T, max(T - 2, 0), 1], side)
    weights = torch.rand(B, T, dtype=torch.float64) * 3 + 0.1
    got = ref.weighted_mtp_cross_entropy(logits, labels, mask, weights=weights, reduction=reduction)
    torch.testing.assert_close(got, brute_mtp(logits, labels, mask, weights, -100, reduction))


def test_weight_index_is_t_plus_k_minus_1():
    """Only weights[2] nonzero: exactly the predictions of token 3 (head k at t = 3 - k) count."""
    B, T, H, V = 1, 6, 3, 7
    logits = torch.randn(B, T, H, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    weights = torch.zeros(B, T, dtype=torch.float64)
    weights[0, 2] = 1.0
    per = ref.weighted_mtp_cross_entropy(logits, labels, weights=weights, reduction="none")
    nonzero = {(t, k + 1) for t, k in zip(*per[0].nonzero(as_tuple=True))}
    assert {(int(t), int(k)) for t, k in nonzero} == {(2, 1), (1, 2), (0, 3)}


def test_values_path_equals_precomputed_weights():
    B, T, H, V = 2, 6, 3, 9
    logits = torch.randn(B, T, H, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    mask = padded_mask(B, T, [6, 4], "left")
    values, rewards = torch.rand(B, T, 1, dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    for terminal in ("last_state", "last_transition"):
        w = ref.build_weights(ref.compute_td_errors(values, rewards, mask, terminal=terminal))
        a = ref.weighted_mtp_cross_entropy(
            logits, labels, mask, values=values, rewards=rewards, terminal=terminal
        )
        b = ref.weighted_mtp_cross_entropy(logits, labels, mask, weights=w)
        torch.testing.assert_close(a, b)


def test_all_masked_rows_finite_and_zero_gradient():
    B, T, H, V = 2, 5, 3, 8
    logits = torch.randn(B, T, H, V, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[1] = 1
    loss = ref.weighted_mtp_cross_entropy(logits, labels, mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert (logits.grad[0] == 0).all() and logits.grad[1].abs().sum() > 0
    empty = torch.randn(B, T, H, V, requires_grad=True)
    loss_empty = ref.weighted_mtp_cross_entropy(empty, labels, torch.zeros(B, T))
    loss_empty.backward()
    assert loss_empty.item() == 0.0 and (empty.grad == 0).all()


def test_short_sequence_mean_still_divides_by_all_heads():
    """T < H: heads without a target contribute 0, the mean is over all H heads (divided by n_future)."""
    B, T, H, V = 1, 2, 4, 5
    logits = torch.randn(B, T, H, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    got = ref.weighted_mtp_cross_entropy(logits, labels)
    expected = F.cross_entropy(logits[0, 0, 0][None], labels[0, 1][None]) / H
    torch.testing.assert_close(got, expected)


def test_from_hidden_equals_logits_path_with_bias():
    B, T, H, d, V = 2, 5, 3, 6, 13
    hidden = torch.randn(B, T, H, d, dtype=torch.float64)
    w, b = torch.randn(V, d, dtype=torch.float64), torch.randn(V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    weights = torch.rand(B, T, dtype=torch.float64)
    got = ref.weighted_mtp_loss_from_hidden(hidden, w, labels, weights=weights, lm_head_bias=b)
    expected = ref.weighted_mtp_cross_entropy(hidden @ w.T + b, labels, weights=weights)
    torch.testing.assert_close(got, expected)


def test_return_stats_per_head_ce_and_weight_stats():
    B, T, H, V = 2, 6, 2, 7
    logits = torch.randn(B, T, H, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    values, rewards = torch.rand(B, T, dtype=torch.float64), torch.ones(B, dtype=torch.float64)
    _, stats = ref.weighted_mtp_cross_entropy(
        logits, labels, values=values, rewards=rewards, return_stats=True
    )
    ce1 = F.cross_entropy(logits[:, :-1, 0].reshape(-1, V), labels[:, 1:].reshape(-1))
    assert stats["ce_head1"] == pytest.approx(ce1.item())
    w = ref.build_weights(ref.compute_td_errors(values, rewards))
    assert stats["weight_mean"] == pytest.approx(w[:, :-1].mean().item())
    assert {"td_mean", "td_std", "td_min", "td_max", "weight_entropy"} <= stats.keys()


# ---------------------------------------------------------------- gradients


def test_build_weights_gradcheck():
    td = (torch.randn(12, dtype=torch.float64) * 0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: ref.build_weights(x, beta=0.7, min_weight=0.2, max_weight=3.0), td
    )


def test_loss_gradcheck_through_values():
    B, T, H, V = 2, 5, 2, 4
    logits = torch.randn(B, T, H, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    mask = padded_mask(B, T, [5, 3], "right")
    values = (torch.rand(B, T, dtype=torch.float64) * 0.5).requires_grad_()
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)

    def loss_of(v):
        return ref.weighted_mtp_cross_entropy(logits, labels, mask, values=v, rewards=rewards, beta=2.0)

    assert torch.autograd.gradcheck(loss_of, values)


# ---------------------------------------------------------------- statistics


def test_stats_skip_nan_and_inf():
    td = torch.tensor([0.1, float("nan"), -0.3, float("inf"), 0.2])
    stats = ref.compute_td_stats(td)
    finite = torch.tensor([0.1, -0.3, 0.2]).double()
    assert stats["td_mean"] == pytest.approx(finite.mean().item(), abs=1e-12)
    assert stats["td_std"] == pytest.approx(finite.std(unbiased=False).item())
    assert (stats["td_min"], stats["td_max"]) == pytest.approx((-0.3, 0.2))
    w = ref.compute_weight_stats(torch.tensor([1.0, float("nan"), 1.0, float("-inf")]))
    assert all(math.isfinite(x) for x in w.values()) and w["weight_entropy"] == pytest.approx(1.0)


def test_stats_masked_and_empty():
    td = torch.tensor([[1.0, 2.0, 100.0]])
    assert ref.compute_td_stats(td, torch.tensor([[1, 1, 0]]))["td_max"] == 2.0
    assert ref.compute_td_stats(td, torch.zeros(1, 3)) == {
        "td_mean": 0.0,
        "td_std": 0.0,
        "td_min": 0.0,
        "td_max": 0.0,
    }
    assert ref.compute_weight_stats(td, torch.zeros(1, 3))["weight_entropy"] == 0.0


def test_weight_entropy_normalised():
    assert ref.compute_weight_stats(torch.full((10,), 2.5))["weight_entropy"] == pytest.approx(1.0)
    peaked = ref.compute_weight_stats(torch.tensor([5.0] + [1e-6] * 9))["weight_entropy"]
    assert 0.0 <= peaked < 0.05
    w = torch.tensor([1.0, 2.0, 3.0])
    p = w / w.sum()
    assert ref.compute_weight_stats(w)["weight_entropy"] == pytest.approx(
        (-(p * p.log()).sum() / math.log(3)).item()
    )


# ---------------------------------------------------------------- value loss and explained variance


def test_value_loss_masked_mse_and_huber():
    v = torch.tensor([[0.2, 0.4, 9.0]])
    r = torch.tensor([1.0])
    m = torch.tensor([[1, 1, 0]])
    assert ref.value_loss(v, r, m).item() == pytest.approx((0.8**2 + 0.6**2) / 2)
    assert ref.value_loss(v, r, m, loss_type="huber", huber_delta=0.5).item() == pytest.approx(
        (0.5 * (0.8 - 0.25) + 0.5 * (0.6 - 0.25)) / 2
    )


def test_value_clipping_bounds_the_update():
    """Inside the clip range the gradient is the plain one; once V has moved c towards R it stops."""
    old, r, c = torch.tensor([[0.5]]), torch.tensor([1.0]), 0.2
    inside = torch.tensor([[0.6]], requires_grad=True)
    ref.value_loss(inside, r, old_values=old, clip_range=c).backward()
    assert inside.grad.item() == pytest.approx(2 * (0.6 - 1.0))
    beyond = torch.tensor([[0.9]], requires_grad=True)
    loss = ref.value_loss(beyond, r, old_values=old, clip_range=c)
    loss.backward()
    assert loss.item() == pytest.approx((0.7 - 1.0) ** 2) and beyond.grad.item() == 0.0
    v = old.clone().requires_grad_()
    opt = torch.optim.SGD([v], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        ref.value_loss(v, r, old_values=old, clip_range=c).backward()
        opt.step()
    assert v.item() <= 0.5 + c + 0.05 * 2 * 1.0


def test_explained_variance():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    v = r[:, None].expand(4, 3).clone()
    assert ref.explained_variance(v, r) == pytest.approx(1.0)
    assert ref.explained_variance(torch.full((4, 3), 0.5), r) == pytest.approx(0.0)
    assert math.isnan(ref.explained_variance(torch.rand(2, 3), torch.ones(2)))
    noisy = v + 0.1 * torch.randn(4, 3)
    ev = ref.explained_variance(noisy, r, torch.tensor([[1, 1, 0]] * 4))
    assert 0.9 < ev < 1.0


# ---------------------------------------------------------------- properties (hypothesis)


@settings(max_examples=60, deadline=None)
@given(
    td=st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=20),
    beta=st.floats(0.05, 5.0),
    lo=st.floats(0.0, 1.0),
    span=st.floats(0.0, 10.0),
)
def test_weights_always_within_clip(td, beta, lo, span):
    w = ref.build_weights(torch.tensor(td, dtype=torch.float64), beta, lo, lo + span)
    assert (w >= lo).all() and (w <= lo + span).all()


def plain_mtp_ce(logits, labels, mask, ignore_index=-100):
    """Uniform-weight MTP CE with F.cross_entropy's own ignore_index handling."""
    B, T, H, V = logits.shape
    losses = []
    for k in range(1, H + 1):
        if T - k <= 0:
            losses.append(logits.new_zeros(()))
            continue
        target = labels[:, k:].clone()
        target[~(mask[:, :-k].bool() & mask[:, k:].bool())] = ignore_index
        if (target == ignore_index).all():
            losses.append(logits.new_zeros(()))
            continue
        losses.append(
            F.cross_entropy(
                logits[:, :-k, k - 1].reshape(-1, V), target.reshape(-1), ignore_index=ignore_index
            )
        )
    return torch.stack(losses).mean()


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 7),
    H=st.integers(1, 4),
    V=st.integers(2, 9),
    side=st.sampled_from(["left", "right"]),
    data=st.data(),
)
def test_uniform_weights_reduce_to_plain_mtp_ce(B, T, H, V, side, data):
    lengths = data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    mask = padded_mask(B, T, lengths, side)
    logits = torch.randn(B, T, H, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    got = ref.weighted_mtp_cross_entropy(logits, labels, mask, weights=torch.ones(B, T, dtype=torch.float64))
    torch.testing.assert_close(got, plain_mtp_ce(logits, labels, mask))
    torch.testing.assert_close(ref.weighted_mtp_cross_entropy(logits, labels, mask), got)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 6), H=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_batch_permutation_permutes_per_row_losses(B, T, H, seed):
    g = torch.Generator().manual_seed(seed)
    V = 5
    logits = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    values, rewards = (
        torch.rand(B, T, generator=g, dtype=torch.float64),
        torch.rand(B, generator=g, dtype=torch.float64),
    )
    mask = padded_mask(B, T, torch.randint(0, T + 1, (B,), generator=g).tolist(), "right")
    perm = torch.randperm(B, generator=g)
    per = ref.weighted_mtp_cross_entropy(
        logits, labels, mask, values=values, rewards=rewards, reduction="none"
    )
    per_perm = ref.weighted_mtp_cross_entropy(
        logits[perm], labels[perm], mask[perm], values=values[perm], rewards=rewards[perm], reduction="none"
    )
    torch.testing.assert_close(per_perm, per[perm])


# ---------------------------------------------------------------- input validation (see also test_bad_inputs)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"labels": torch.zeros(2, 4)}, TypeError, ["labels", "dtype"]),
        ({"labels": torch.zeros(2, 3, dtype=torch.long)}, ValueError, ["labels", "[2, 4]", "[2, 3]"]),
        ({"labels": torch.full((2, 4), 7)}, ValueError, ["labels", "[0, 7)"]),
        ({"attention_mask": torch.ones(2, 5)}, ValueError, ["attention_mask", "[2, 4]"]),
        (
            {"weights": torch.ones(2, 4), "values": torch.ones(2, 4), "rewards": torch.ones(2)},
            ValueError,
            ["weights", "values"],
        ),
        ({"values": torch.ones(2, 4)}, ValueError, ["values", "rewards"]),
        ({"values": torch.ones(2, 4), "rewards": torch.ones(3)}, ValueError, ["rewards", "[2]", "[3]"]),
        ({"weights": torch.ones(4, 2)}, ValueError, ["weights", "[2, 4]"]),
        ({"reduction": "avg"}, ValueError, ["reduction"]),
        ({"terminal": "end"}, ValueError, ["terminal"]),
        ({"beta": 0.0}, ValueError, ["beta"]),
        ({"min_weight": 2.0, "max_weight": 1.0}, ValueError, ["min_weight", "max_weight"]),
    ],
)
def test_bad_inputs_name_argument_and_shapes(kwargs, error, words):
    args = {"logits": torch.randn(2, 4, 3, 7), "labels": torch.zeros(2, 4, dtype=torch.long)}
    args.update(kwargs)
    with pytest.raises(error) as info:
        ref.weighted_mtp_cross_entropy(**args)
    for word in words:
        assert word in str(info.value)
