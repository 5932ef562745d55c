"""The production TD / weight / mask / statistics / critic functions agree with the independent oracle.

Production code (``wmtp_kernels.td_weights``, ``masks``, ``stats``, ``critic``; what the kernels and the
trainer call) and ``wmtp_kernels.reference`` share no computation, so a change to either shows up here.
"""

import math

import pytest
import torch

import wmtp_kernels
from wmtp_kernels import reference as ref
from wmtp_kernels.options import WeightingOptions
from wmtp_kernels.td_weights import td_weight_grads, token_weights

MASKS = {
    "right": torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [0] * 7]),
    "left": torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1, 1]]),
    "holes": torch.tensor([[1, 1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1, 0], [1, 0, 1, 0, 1, 0, 1], [1] * 7]),
}


def critic_case(side, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    values = (torch.rand(4, 7, generator=g, dtype=dtype) * 2 - 0.5).requires_grad_()
    rewards = torch.rand(4, generator=g, dtype=dtype).requires_grad_()
    return values, rewards, MASKS[side]


@pytest.mark.parametrize("side", list(MASKS))
@pytest.mark.parametrize("terminal", ["last_state", "last_transition"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_td_errors_values_and_gradients(side, terminal, gamma):
    values, rewards, mask = critic_case(side)
    ours = wmtp_kernels.compute_td_errors(values, rewards, mask, gamma, terminal)
    truth = ref.compute_td_errors(values, rewards, mask, gamma, terminal)
    torch.testing.assert_close(ours, truth, rtol=0, atol=1e-15)
    probe = torch.randn_like(truth)
    ours_grads = torch.autograd.grad(ours, (values, rewards), probe)
    truth_grads = torch.autograd.grad(truth, (values, rewards), probe)
    for a, b in zip(ours_grads, truth_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


@pytest.mark.parametrize("side", list(MASKS))
@pytest.mark.parametrize("terminal", ["last_state", "last_transition"])
def test_weight_gradient_formula_matches_reference_autograd(side, terminal):
    """td_weight_grads (no autograd) equals autograd through the reference, clipped entries included."""
    values, rewards, mask = critic_case(side, seed=3)
    options = WeightingOptions(gamma=0.8, beta=0.4, min_weight=0.5, max_weight=1.8, terminal=terminal)
    weights = ref.build_weights(
        ref.compute_td_errors(values, rewards, mask, options.gamma, terminal),
        options.beta,
        options.min_weight,
        options.max_weight,
    )
    clipped = (weights == options.min_weight) | (weights == options.max_weight)
    assert clipped.any() and not clipped.all()  # the case exercises both branches
    probe = torch.randn_like(weights)
    truth = torch.autograd.grad(weights, (values, rewards), probe)
    ours = td_weight_grads(probe, values, rewards, mask, options)
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    ours_w, ours_td = token_weights(None, values, rewards, mask, values, options)
    torch.testing.assert_close(ours_w, weights, rtol=0, atol=1e-15)
    assert ours_td is not None


def test_build_weights_matches_and_clips():
    td = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    ours = wmtp_kernels.build_weights(td, 0.7, 0.2, 3.0)
    truth = ref.build_weights(td, 0.7, 0.2, 3.0)
    torch.testing.assert_close(ours, truth, rtol=0, atol=0)
    torch.testing.assert_close(*(torch.autograd.grad(w.sum(), td)[0] for w in (ours, truth)))


@pytest.mark.parametrize("side", list(MASKS))
@pytest.mark.parametrize("ignore", [-100, 5])
def test_masks(side, ignore):
    mask = MASKS[side]
    labels = torch.randint(0, 9, mask.shape, generator=torch.Generator().manual_seed(1))
    labels[0, :2] = ignore
    assert wmtp_kernels.last_token_index(mask).tolist() == ref.last_token_index(mask).tolist()
    for attention in (mask, None):
        for k in range(1, 9):
            ours = wmtp_kernels.head_valid_mask(labels, attention, k, ignore)
            assert torch.equal(ours, ref.head_valid_mask(labels, attention, k, ignore)), k
        ours = wmtp_kernels.applied_weight_mask(labels, attention, ignore)
        assert torch.equal(ours, ref.applied_weight_mask(labels, attention, ignore))


STAT_INPUTS = {
    "plain": (torch.tensor([[0.3, -1.2, 2.5], [0.1, 0.0, 4.0]]), None),
    "masked": (torch.tensor([[0.3, -1.2, 2.5], [0.1, 0.0, 4.0]]), torch.tensor([[1, 0, 1], [1, 1, 0]])),
    "non-finite": (torch.tensor([0.1, float("nan"), 2.0, float("inf"), -float("inf")]), None),
    "single": (torch.tensor([[2.0, 3.0]]), torch.tensor([[0, 1]])),
    "empty mask": (torch.tensor([[2.0, 3.0]]), torch.zeros(1, 2)),
    "zero size": (torch.zeros(0), None),
    "zero sum": (torch.zeros(4), None),
}


@pytest.mark.parametrize("name", list(STAT_INPUTS))
def test_statistics(name):
    x, mask = STAT_INPUTS[name]
    for ours, truth in (
        (wmtp_kernels.compute_td_stats(x, mask), ref.compute_td_stats(x, mask)),
        (wmtp_kernels.compute_weight_stats(x.abs(), mask), ref.compute_weight_stats(x.abs(), mask)),
    ):
        assert ours.keys() == truth.keys()
        for key in truth:
            assert ours[key] == pytest.approx(truth[key], rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("loss_type", ["mse", "huber"])
@pytest.mark.parametrize("clip", [None, 0.15])
@pytest.mark.parametrize("masked", [False, True])
def test_value_loss_and_explained_variance(loss_type, clip, masked):
    values, rewards, mask = critic_case("holes", seed=5)
    values3 = values[..., None]  # [B, T, 1] as the value head returns it
    old = (values.detach() + 0.2 * torch.randn(values.shape, dtype=values.dtype))[..., None]
    args = dict(mask=mask if masked else None, old_values=old, clip_range=clip, loss_type=loss_type)
    ours = wmtp_kernels.value_loss(values3, rewards, huber_delta=0.3, **args)
    truth = ref.value_loss(values3, rewards, huber_delta=0.3, **args)
    torch.testing.assert_close(ours, truth, rtol=1e-14, atol=1e-15)
    for a, b in zip(*(torch.autograd.grad(x, (values, rewards)) for x in (ours, truth))):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    m = mask if masked else None
    assert wmtp_kernels.explained_variance(values, rewards, m) == pytest.approx(
        ref.explained_variance(values, rewards, m), rel=1e-12, abs=1e-12
    )


def test_explained_variance_nan_cases():
    assert math.isnan(wmtp_kernels.explained_variance(torch.rand(2, 3), torch.ones(2)))
    assert math.isnan(wmtp_kernels.explained_variance(torch.rand(2, 3), torch.rand(2), torch.zeros(2, 3)))
