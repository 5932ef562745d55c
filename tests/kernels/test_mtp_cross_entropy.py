"""The logits entry point and the torch chunk primitive: parity, in-place semantics, edge rows."""

import pytest
import torch
from _compare import assert_no_worse
from test_mtp_loss import make_case

from wmtp_kernels import reference as ref
from wmtp_kernels import weighted_mtp_cross_entropy
from wmtp_kernels._rows import build_row_layout, td_row_inputs, td_row_weights
from wmtp_kernels._torch_path import weighted_ce_chunk_
from wmtp_kernels.options import WeightingOptions

DIFFERENTIABLE = ("logits", "weights", "values")


def logits_case(source="weights", padding="right", B=3, T=7, H=4, V=123, seed=0):
    case = make_case(B=B, T=T, H=H, d=4, V=V, source=source, padding=padding, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    del case["hidden"], case["lm_head_weight"]
    case["logits"] = torch.randn(B, T, H, V, generator=g, dtype=torch.float64) * 3
    return case


def run(fn, case, dtype, reduction, **kwargs):
    """Loss, stats and gradients; logits enter through a non-leaf (``leaf * 1``) as in a model."""
    inputs, leaves = {}, {}
    for name, t in case.items():
        if t.is_floating_point():
            t = t.to(dtype).requires_grad_(name in DIFFERENTIABLE)
            leaves[name] = t
            if name == "logits":
                t = t * 1
        inputs[name] = t
    loss, stats = fn(**inputs, reduction=reduction, return_stats=True, **kwargs)
    g = torch.Generator().manual_seed(3)
    grad_out = (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.dtype)
    names = [n for n in DIFFERENTIABLE if n in leaves]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], grad_out)
    return loss.detach(), stats, dict(zip(names, grads))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("source", ["weights", "values", "uniform"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_matches_reference(impl, dtype, reduction, source, padding):
    if impl == "triton":
        pytest.importorskip("wmtp_kernels._triton_ce")
    case = logits_case(source, padding)
    truth = run(ref.weighted_mtp_cross_entropy, case, torch.float64, reduction)
    same = run(ref.weighted_mtp_cross_entropy, case, dtype, reduction)
    ours = run(weighted_mtp_cross_entropy, case, dtype, reduction, chunk_size=5, impl=impl)
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # float32 loss
    assert_no_worse("loss", ours[0], same[0], truth[0])
    for name in truth[2]:
        assert_no_worse(f"grad {name}", ours[2][name], same[2][name], truth[2][name])
    assert ours[1].keys() == truth[1].keys()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for key in truth[1]:  # weight / TD statistics come from the inputs as given, like the reference's
        assert ours[1][key] == pytest.approx(same[1][key], rel=tol, abs=tol), key


def test_odd_vocab_and_short_sequences():
    for shape in ({"B": 1, "T": 4, "H": 2, "V": 50257}, {"B": 2, "T": 2, "H": 4, "V": 7}):
        case = logits_case("values", **shape)
        truth = run(ref.weighted_mtp_cross_entropy, case, torch.float64, "mean")
        ours = run(weighted_mtp_cross_entropy, case, torch.float32, "mean", chunk_size=3)
        torch.testing.assert_close(ours[0].double(), truth[0], rtol=1e-5, atol=1e-6)
        for name in truth[2]:
            torch.testing.assert_close(ours[2][name].double(), truth[2][name], rtol=1e-4, atol=1e-7)


def test_gradient_is_written_into_the_callers_logits():
    case = logits_case()
    leaf = case["logits"].float().requires_grad_()
    logits = leaf * 1
    loss = weighted_mtp_cross_entropy(logits, case["labels"], case["attention_mask"], weights=case["weights"])
    expected = logits.detach().clone()  # already the gradient: overwritten in the forward pass
    loss.backward()
    torch.testing.assert_close(leaf.grad, expected)
    truth = leaf.detach().clone().requires_grad_()
    ref.weighted_mtp_cross_entropy(
        truth, case["labels"], case["attention_mask"], weights=case["weights"]
    ).backward()
    torch.testing.assert_close(leaf.grad, truth.grad, rtol=1e-5, atol=1e-7)


def test_leaf_logits_refused_in_place_and_accepted_out_of_place():
    case = logits_case()
    leaf = case["logits"].float().requires_grad_()
    with pytest.raises(ValueError, match="inplace=False"):
        weighted_mtp_cross_entropy(leaf, case["labels"], weights=case["weights"])
    before = leaf.detach().clone()
    weighted_mtp_cross_entropy(leaf, case["labels"], weights=case["weights"], inplace=False).backward()
    assert torch.equal(leaf.detach(), before)
    truth = before.clone().requires_grad_()
    ref.weighted_mtp_cross_entropy(truth, case["labels"], weights=case["weights"]).backward()
    torch.testing.assert_close(leaf.grad, truth.grad, rtol=1e-5, atol=1e-7)


def test_no_gradient_needed_leaves_logits_untouched():
    case = logits_case()
    logits = case["logits"].float()
    before = logits.clone()
    loss = weighted_mtp_cross_entropy(logits, case["labels"], weights=case["weights"], chunk_size=4)
    assert torch.equal(logits, before)
    expected = ref.weighted_mtp_cross_entropy(before, case["labels"], weights=case["weights"])
    torch.testing.assert_close(loss, expected)


def test_non_contiguous_logits():
    case = logits_case()
    base = case["logits"].float().transpose(1, 2).contiguous().requires_grad_()
    logits = base.transpose(1, 2)  # [B, T, H, V] view, not contiguous
    assert not logits.is_contiguous()
    weighted_mtp_cross_entropy(logits, case["labels"], weights=case["weights"]).backward()
    truth = case["logits"].float().requires_grad_()
    ref.weighted_mtp_cross_entropy(truth, case["labels"], weights=case["weights"]).backward()
    torch.testing.assert_close(base.grad.transpose(1, 2), truth.grad, rtol=1e-5, atol=1e-7)


# --- the torch chunk primitive (the contract shared with the Triton kernel) ---


def truth_chunk(logits, targets, scale, weights):
    x = logits.double()
    live = scale != 0
    x = torch.where(live[:, None], x, 0.0)
    lse = torch.logsumexp(x, dim=1)
    ce = torch.where(live, lse - x.gather(1, targets[:, None]).squeeze(1), 0.0)
    grad = torch.softmax(x, dim=1)
    grad[torch.arange(len(targets)), targets] -= 1
    return ce, grad * (weights.double() * scale.double())[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_chunk_primitive(dtype):
    rows, vocab = 9, 301
    logits = torch.randn(rows, vocab, dtype=torch.float64) * 4
    logits[2, 17] = -150.0  # target 150 nats below the rest: p underflows in float32
    logits[5] = float("nan")  # a row that does not count may hold anything
    targets = torch.randint(0, vocab, (rows,))
    targets[2] = 17
    per_row = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.rand(rows, dtype=per_row) + 0.5
    scale[5] = 0.0
    weights = torch.rand(rows, dtype=per_row) * 3
    work = logits.to(dtype)
    ce_truth, grad_truth = truth_chunk(work, targets, scale, weights)
    ce, row_weight = weighted_ce_chunk_(work, targets, scale, weights, None)
    assert torch.equal(row_weight, weights)
    torch.testing.assert_close(ce.double(), ce_truth, rtol=1e-6, atol=1e-5)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(work.double(), grad_truth, rtol=tol, atol=tol * 1e-2)
    assert work[5].abs().max() == 0 and ce[5] == 0


def test_chunk_primitive_on_a_row_strided_view():
    buffer = torch.randn(6, 40)
    view = buffer[:, :33]
    tail = buffer[:, 33:].clone()
    targets, scale, weights = torch.randint(0, 33, (6,)), torch.ones(6), torch.ones(6)
    ce_truth, grad_truth = truth_chunk(view.clone(), targets, scale, weights)
    ce, _ = weighted_ce_chunk_(view, targets, scale, weights, None)
    torch.testing.assert_close(view.double(), grad_truth, rtol=1e-5, atol=1e-7)
    assert torch.equal(buffer[:, 33:], tail)


@pytest.mark.parametrize("terminal", ["last_state", "last_transition"])
def test_td_row_weights_match_reference(terminal):
    case = logits_case("values", padding="left")
    mask = case["attention_mask"]
    mask[2, :] = 0  # an empty sequence
    mask[0, 1:] = 0  # a single real token
    options = WeightingOptions(gamma=0.95, beta=0.7, terminal=terminal)
    layout = build_row_layout(case["labels"], mask, 4, ref.IGNORE_INDEX)
    td = td_row_inputs(layout, case["values"], case["rewards"], mask, options, torch.float64)
    ours = td_row_weights(td)
    td_truth = ref.compute_td_errors(case["values"], case["rewards"], mask, 0.95, terminal)
    weights = ref.build_weights(td_truth, 0.7, options.min_weight, options.max_weight)
    torch.testing.assert_close(ours, weights[layout.row_b, layout.row_j], rtol=1e-12, atol=0)
