"""Parity of the linear-fused loss with the reference: loss, stats and every gradient.

Rule (CCE style): against a float64 ground truth, our error is no worse than the same-dtype
reference's plus a small slack (``_compare.assert_no_worse``). Tiny chunk sizes force many chunks and
a last partial chunk.
"""

import pytest
import torch
from _compare import assert_no_worse
from torch.utils._python_dispatch import TorchDispatchMode

from wmtp_kernels import (
    FusedWeightedMTPLoss,
    WeightingOptions,
    fused_weighted_mtp_loss,
    weighted_mtp_cross_entropy,
)
from wmtp_kernels import reference as ref

IMPLS = ["torch", "triton"]


def make_case(B=3, T=7, H=4, d=16, V=123, padding="right", source="weights", bias=False, ignore=True, seed=0):
    """float64 master inputs: hidden, weight, optional bias, labels, mask, and the weight source."""
    g = torch.Generator().manual_seed(seed)
    case = {
        "hidden": torch.randn(B, T, H, d, generator=g, dtype=torch.float64),
        "lm_head_weight": torch.randn(V, d, generator=g, dtype=torch.float64) / d**0.5 * 2,
        "labels": torch.randint(0, V, (B, T), generator=g),
    }
    if bias:
        case["lm_head_bias"] = torch.randn(V, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.long)
    if padding == "right" and B > 1:
        mask[1, T - 2 :] = 0
    elif padding == "left" and B > 1:
        mask[1, :2] = 0
    case["attention_mask"] = mask
    if ignore:
        case["labels"][0, : min(2, T)] = ref.IGNORE_INDEX  # a prompt
    if source == "weights":
        case["weights"] = torch.rand(B, T, generator=g, dtype=torch.float64) * 4.9 + 0.1
    elif source == "values":
        case["values"] = torch.rand(B, T, generator=g, dtype=torch.float64)
        case["rewards"] = torch.rand(B, generator=g, dtype=torch.float64)
    return case


DIFFERENTIABLE = ("hidden", "lm_head_weight", "lm_head_bias", "weights", "values")


def run(fn, case, dtype, reduction, grad_seed=1, **kwargs):
    """Loss, stats and gradients of every differentiable input, inputs cast to ``dtype``."""
    inputs = {}
    for name, t in case.items():
        if t.is_floating_point():
            t = t.to(dtype).requires_grad_(name in DIFFERENTIABLE)
        inputs[name] = t
    loss, stats = fn(**inputs, reduction=reduction, return_stats=True, **kwargs)
    g = torch.Generator().manual_seed(grad_seed)
    grad_out = (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(loss.dtype)
    names = [n for n in DIFFERENTIABLE if n in inputs]
    grads = torch.autograd.grad(loss, [inputs[n] for n in names], grad_out)
    return loss.detach(), stats, dict(zip(names, grads))


def check_parity(case, dtype, reduction, slack=None, **kwargs):
    truth = run(ref.weighted_mtp_loss_from_hidden, case, torch.float64, reduction)
    same = run(ref.weighted_mtp_loss_from_hidden, case, dtype, reduction)
    ours = run(fused_weighted_mtp_loss, case, dtype, reduction, **kwargs)
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # float32 loss
    assert_no_worse("loss", ours[0], same[0], truth[0], slack=slack)
    for name in truth[2]:
        assert_no_worse(f"grad {name}", ours[2][name], same[2][name], truth[2][name], slack=slack)
    assert ours[1].keys() == truth[1].keys()
    return ours, truth


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("source", ["weights", "values", "uniform"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("bias", [False, True])
def test_torch_path_matches_reference(dtype, reduction, source, padding, bias):
    case = make_case(padding=padding, source=source, bias=bias)
    check_parity(case, dtype, reduction, chunk_size=5, impl="torch")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("source", ["weights", "values"])
def test_triton_path_matches_reference(reduction, source):
    pytest.importorskip("wmtp_kernels._triton_ce")
    case = make_case(B=2, T=5, H=3, d=8, V=37, source=source, bias=True)
    check_parity(case, torch.float32, reduction, chunk_size=4, impl="triton")


@pytest.mark.parametrize(
    "shape",
    [
        {"B": 1, "T": 5, "H": 2, "d": 8, "V": 50257},
        {"B": 2, "T": 2, "H": 4, "d": 8, "V": 123},  # T < H: heads 2..4 have no target
        {"B": 3, "T": 9, "H": 1, "d": 8, "V": 64},  # next-token prediction
    ],
    ids=["V=50257", "T<H", "H=1"],
)
@pytest.mark.parametrize("chunk_size", [3, None])
def test_odd_shapes(shape, chunk_size):
    case = make_case(**shape, source="values")
    check_parity(case, torch.float32, "mean", chunk_size=chunk_size)


@pytest.mark.parametrize("terminal", ["last_state", "last_transition"])
def test_terminal_modes_and_options(terminal):
    case = make_case(source="values", padding="left")
    options = {"terminal": terminal, "gamma": 0.9, "beta": 0.5, "min_weight": 0.3, "max_weight": 2.0}
    truth = run(ref.weighted_mtp_loss_from_hidden, case, torch.float64, "mean", **options)
    ours = run(fused_weighted_mtp_loss, case, torch.float64, "mean", chunk_size=4, **options)
    torch.testing.assert_close(ours[0], truth[0], rtol=1e-12, atol=1e-12)
    for name in truth[2]:
        torch.testing.assert_close(ours[2][name], truth[2][name], rtol=1e-10, atol=1e-12)


def test_custom_ignore_index():
    case = make_case(ignore=False)
    case["labels"][2, 3:5] = 7
    truth = run(ref.weighted_mtp_loss_from_hidden, case, torch.float64, "sum", ignore_index=7)
    ours = run(fused_weighted_mtp_loss, case, torch.float64, "sum", ignore_index=7, chunk_size=6)
    torch.testing.assert_close(ours[0], truth[0])
    assert ours[2]["hidden"][2, 2:4, 0].abs().max() == 0  # head 1 at t = 2, 3 predicts an ignored label


@pytest.mark.parametrize("shape", ["masked", "T=1"])
def test_nothing_to_predict_gives_zero_loss_and_gradients(shape):
    case = make_case(source="values", T=1 if shape == "T=1" else 7)
    if shape == "masked":
        case["attention_mask"].zero_()
    for reduction in ("mean", "sum", "none"):
        loss, stats, grads = run(fused_weighted_mtp_loss, case, torch.float32, reduction, chunk_size=4)
        assert torch.isfinite(loss).all() and loss.abs().max() == 0
        for name, grad in grads.items():
            assert torch.isfinite(grad).all() and grad.abs().max() == 0, name
        assert all(v == v for v in stats.values())  # no NaN


def test_non_uniform_weights_scale_rows():
    """A zero weight silences its rows; doubling all weights doubles loss and gradients."""
    case = make_case(source="weights", ignore=False, padding="none")
    case["weights"][0, 3] = 0.0
    loss, _, grads = run(fused_weighted_mtp_loss, case, torch.float64, "sum", chunk_size=5)
    # weight index j = t + k - 1 = 3: head 1 at t = 3, head 2 at t = 2, head 3 at t = 1, head 4 at t = 0
    for k in range(1, 5):
        assert grads["hidden"][0, 4 - k, k - 1].abs().max() == 0
    assert grads["hidden"][0, 4, 0].abs().max() > 0
    case["weights"] = case["weights"] * 2
    loss2, _, grads2 = run(fused_weighted_mtp_loss, case, torch.float64, "sum", chunk_size=5)
    torch.testing.assert_close(loss2, 2 * loss)
    torch.testing.assert_close(grads2["lm_head_weight"], 2 * grads["lm_head_weight"])


@pytest.mark.parametrize("source", ["weights", "values", "uniform"])
def test_stats_match_reference(source):
    case = make_case(source=source, padding="left")
    _, truth, _ = run(ref.weighted_mtp_loss_from_hidden, case, torch.float64, "mean")
    _, ours, _ = run(fused_weighted_mtp_loss, case, torch.float32, "mean", chunk_size=7)
    assert ours.keys() == truth.keys()
    for key in truth:
        assert ours[key] == pytest.approx(truth[key], rel=1e-5, abs=1e-5), key


def test_cross_entropy_near_float32_underflow_is_exact():
    """A target logit ~100 nats below the max: -log(p) would underflow; the row is recomputed."""
    case = make_case(B=1, T=4, H=2, d=4, V=16, source="uniform", ignore=False, padding="none")
    case["lm_head_weight"] = torch.zeros(16, 4, dtype=torch.float64)
    case["lm_head_weight"][0, 0] = 1.0
    case["hidden"][..., 0] = 100.0
    case["labels"] = torch.tensor([[0, 3, 5, 0]])
    truth = run(ref.weighted_mtp_loss_from_hidden, case, torch.float64, "none")
    ours = run(fused_weighted_mtp_loss, case, torch.float32, "none", chunk_size=2)
    torch.testing.assert_close(ours[0].double(), truth[0], rtol=1e-6, atol=1e-5)
    assert ours[0].max() > 90


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_values_and_rewards(reduction):
    case = make_case(B=2, T=5, H=3, d=4, V=9, source="values", padding="left")
    hidden, weight, labels, mask = (case[k] for k in ("hidden", "lm_head_weight", "labels", "attention_mask"))
    values = case["values"].requires_grad_()
    rewards = case["rewards"].requires_grad_()

    def loss(v, r):
        return fused_weighted_mtp_loss(
            hidden, weight, labels, mask, values=v, rewards=r, chunk_size=4, beta=0.5, reduction=reduction
        )

    assert torch.autograd.gradcheck(loss, (values, rewards))


def test_gradients_are_handed_over_without_copy():
    case = make_case()
    weight = case["lm_head_weight"].float().requires_grad_()
    hidden = case["hidden"].float().requires_grad_()
    loss = fused_weighted_mtp_loss(hidden, weight, case["labels"], weights=case["weights"].float())
    stored = [g.data_ptr() for g in loss.grad_fn.grads.large[:2]]
    loss.backward()
    assert [hidden.grad.data_ptr(), weight.grad.data_ptr()] == stored


def test_no_grad_call_and_module_wrapper():
    case = make_case(source="weights")
    module = FusedWeightedMTPLoss(reduction="sum", chunk_size=4)
    assert "reduction='sum'" in repr(module)
    with torch.no_grad():
        loss = module(case["hidden"], case["lm_head_weight"], case["labels"], weights=case["weights"])
    expected = ref.weighted_mtp_loss_from_hidden(
        case["hidden"], case["lm_head_weight"], case["labels"], weights=case["weights"], reduction="sum"
    )
    torch.testing.assert_close(loss, expected)


def test_second_backward_through_retained_graph_is_refused():
    case = make_case()
    hidden = case["hidden"].requires_grad_()
    loss = fused_weighted_mtp_loss(hidden, case["lm_head_weight"], case["labels"], weights=case["weights"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="compute the loss again"):
        loss.backward()


def test_grad_only_for_hidden():
    case = make_case()
    hidden = case["hidden"].requires_grad_()
    fused_weighted_mtp_loss(
        hidden, case["lm_head_weight"], case["labels"], weights=case["weights"]
    ).backward()
    truth = case["hidden"].detach().clone().requires_grad_()
    ref.weighted_mtp_loss_from_hidden(
        truth, case["lm_head_weight"], case["labels"], weights=case["weights"]
    ).backward()
    torch.testing.assert_close(hidden.grad, truth.grad)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"chunk_size": 0}, ValueError, ["chunk_size"]),
        ({"impl": "cuda"}, ValueError, ["impl"]),
        ({"check_finite": True, "hidden": torch.full((2, 3, 2, 4), float("nan"))}, ValueError, ["hidden"]),
        ({"weights": torch.ones(2, 3, dtype=torch.float64)}, None, []),
    ],
    ids=["chunk_size", "impl", "nan hidden", "float64 weights ok"],
)
def test_bad_inputs(kwargs, error, words):
    args = {
        "hidden": torch.randn(2, 3, 2, 4),
        "lm_head_weight": torch.randn(5, 4),
        "labels": torch.randint(0, 5, (2, 3)),
    }
    args.update(kwargs)
    if error is None:
        assert torch.isfinite(fused_weighted_mtp_loss(**args))
        return
    with pytest.raises(error) as info:
        fused_weighted_mtp_loss(**args)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fused_weighted_mtp_loss(
            torch.randn(1, 3, 2, 4), torch.randn(5, 4), torch.zeros(1, 3, dtype=torch.long), impl="triton"
        )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_row_layout_is_built_once_per_call_stats_included(monkeypatch, reduction):
    import wmtp_kernels._autograd as skeleton
    import wmtp_kernels._linear_op as linear_op
    import wmtp_kernels.mtp_cross_entropy as from_logits

    calls = []
    original = skeleton.build_row_layout
    for module in (skeleton, linear_op, from_logits):
        monkeypatch.setattr(module, "build_row_layout", lambda *a, **k: calls.append(1) or original(*a, **k))
    case = make_case(source="values")
    fused_weighted_mtp_loss(**case, reduction=reduction, return_stats=True)
    logits = torch.randn(3, 7, 4, 11)
    weighted_mtp_cross_entropy(
        logits,
        case["labels"] % 11,
        values=case["values"],
        rewards=case["rewards"],
        reduction=reduction,
        return_stats=True,
    )
    assert len(calls) == 2


def test_weighting_options_object_equals_keywords():
    case = make_case(source="values")
    keywords = {
        "gamma": 0.9,
        "beta": 0.5,
        "min_weight": 0.3,
        "max_weight": 2.0,
        "terminal": "last_transition",
    }
    expected = fused_weighted_mtp_loss(**case, **keywords)
    options = WeightingOptions(**keywords)
    torch.testing.assert_close(fused_weighted_mtp_loss(**case, options=options), expected)
    module = FusedWeightedMTPLoss(options=options)
    torch.testing.assert_close(module(**case), expected)
    assert "last_transition" in repr(module)
    with pytest.raises(ValueError, match="not both"):
        fused_weighted_mtp_loss(**case, options=options, beta=0.5)
    with pytest.raises(TypeError, match="WeightingOptions"):
        fused_weighted_mtp_loss(**case, options={"beta": 0.5})


def test_none_reduction_keeps_a_float32_bias_gradient_with_bfloat16_hidden():
    """reduction='none' computes the bias gradient in backward; it must not be rounded to bfloat16.

    With unit incoming gradients, 'none' and 'sum' accumulate the same float32 bias gradient.
    """
    case = make_case(B=2, T=6, H=2, d=8, V=40, bias=True, source="weights")
    grads = {}
    for reduction in ("sum", "none"):
        hidden = case["hidden"].bfloat16().requires_grad_()
        weight = case["lm_head_weight"].bfloat16().requires_grad_()
        bias = case["lm_head_bias"].float().requires_grad_()
        loss = fused_weighted_mtp_loss(
            hidden,
            weight,
            case["labels"],
            case["attention_mask"],
            weights=case["weights"].float(),
            lm_head_bias=bias,
            reduction=reduction,
            chunk_size=5,
        )
        loss.backward(torch.ones_like(loss))
        grads[reduction] = bias.grad
    assert grads["none"].dtype == torch.float32
    torch.testing.assert_close(grads["none"], grads["sum"], rtol=1e-6, atol=1e-7)


class _HostReads(TorchDispatchMode):
    """Records the operators that make the host wait for the device (CUDA) and any indexing by a bool
    mask (it runs ``nonzero`` inside). ``Tensor.tolist`` reads without dispatching, so the one read the
    linear-fused loss allows (valid-row count, label range and rewards together) is not seen here."""

    SYNCING = ("aten.nonzero.default", "aten._local_scalar_dense.default", "aten.is_nonzero.default")

    def __init__(self):
        super().__init__()
        self.found = []
        self.seen_aten_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.seen_aten_ops += name.startswith("aten.")
        bool_index = name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args
            if isinstance(a, (list, tuple))
            for i in a
        )
        if name in self.SYNCING or bool_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("source", ["weights", "values"])
def test_triton_path_reads_the_device_once(monkeypatch, source):
    """Each host read drains the CUDA queue: the training step's forward GPU work must not wait on it
    more than once per call (the count, label range and rewards are read together)."""
    pytest.importorskip("wmtp_kernels._triton_ce")
    import wmtp_kernels._linear_op as linear_op

    reads = _HostReads()

    def watched(*args):  # the operator's implementation, under the mode (the operator itself hides it)
        with reads:
            return original(*args)

    original = linear_op.forward
    monkeypatch.setattr(linear_op, "forward", watched)
    case = make_case(B=2, T=6, H=3, d=8, V=37, source=source)
    inputs = {k: v.float().requires_grad_(k in ("hidden", "lm_head_weight")) for k, v in case.items()}
    inputs["labels"], inputs["attention_mask"] = case["labels"], case["attention_mask"]
    with reads:
        fused_weighted_mtp_loss(**inputs, impl="triton", chunk_size=4).backward()
    assert reads.found == []
    assert reads.seen_aten_ops > 20  # the implementation was watched
