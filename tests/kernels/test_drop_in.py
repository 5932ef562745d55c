"""The loss dropped into other people's training code: torch.compile, fake tensors, autocast, activation
checkpointing, gradient accumulation, second-order gradients."""

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.checkpoint import checkpoint

import wmtp_kernels._linear_op as linear_op
from wmtp_kernels import count_mtp_targets, fused_weighted_mtp_loss, weighted_mtp_cross_entropy
from wmtp_kernels import reference as ref

B, T, H, D, V = 2, 9, 3, 16, 50


class TinyMTP(nn.Module):
    """Embedding "trunk" -> H head states, shared unembedding, value head: the shape of a real caller."""

    def __init__(self, bias=False):
        super().__init__()
        self.emb = nn.Embedding(V, H * D)
        self.head = nn.Linear(D, V, bias=bias)
        self.value = nn.Linear(H * D, 1)

    def hidden_and_values(self, ids):
        return self.from_embeddings(self.emb(ids))

    def from_embeddings(self, x):
        return torch.tanh(x).view(*x.shape[:2], H, D), self.value(x)

    def forward(self, ids, labels, mask, rewards, **loss_kwargs):
        return self.loss_from_embeddings(self.emb(ids), labels, mask, rewards, **loss_kwargs)

    def loss_from_embeddings(self, x, labels, mask, rewards, **loss_kwargs):
        hidden, values = self.from_embeddings(x)
        weight, bias = self.head.weight, self.head.bias
        return fused_weighted_mtp_loss(
            hidden, weight, labels, mask, values=values, rewards=rewards, lm_head_bias=bias, **loss_kwargs
        )


def make_batch(seed, prompt, pad, batch=B):
    """Token ids, labels with ``prompt`` ignored tokens, right padding of ``pad`` on the last row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (batch, T), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = ref.IGNORE_INDEX
    mask = torch.ones(batch, T, dtype=torch.long)
    if pad:
        mask[-1, T - pad :] = 0
    return ids, labels, mask, torch.rand(batch, generator=g)


def loss_and_grads(model, batch, **kwargs):
    model.zero_grad()
    loss = model(*batch, **kwargs)
    loss.sum().backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same(a, b, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=atol)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=atol)


# ------------------------------------------------------------------------------------------- compile


def compiled_run(backend, reduction, steps):
    torch.manual_seed(0)
    model = TinyMTP(bias=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    torch._dynamo.reset()
    counters.clear()
    for step in range(steps):  # every step has another number of valid tokens
        batch = make_batch(step, prompt=1 + step, pad=2 * step)
        assert_same(
            loss_and_grads(compiled, batch, reduction=reduction),
            loss_and_grads(model, batch, reduction=reduction),
        )
    return counters


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fullgraph_compile_matches_eager_and_never_recompiles(reduction):
    stats = compiled_run("aot_eager", reduction, steps=3)
    assert stats["stats"]["unique_graphs"] == 1
    assert not stats["recompiles"]


@pytest.mark.slow
def test_inductor_fullgraph_compile_matches_eager():
    stats = compiled_run("inductor", "mean", steps=2)
    assert stats["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_runs_under_fake_tensor_mode(reduction, device):
    """What a memory estimator does: the model built on fake CPU tensors, or on the meta device."""
    with FakeTensorMode():
        with torch.device(device):
            model = TinyMTP(bias=True)
        ids, labels, mask, rewards = (t.to(device) for t in make_batch(0, prompt=2, pad=1))
        loss = model(ids, labels, mask, rewards, reduction=reduction)
        loss.sum().backward()
        assert loss.dtype == torch.float32 and loss.shape == ((B, T, H) if reduction == "none" else ())
        for p in model.parameters():
            assert p.grad.shape == p.shape and p.grad.dtype == p.dtype and p.grad.device.type == device
        with pytest.raises(ValueError, match="return_stats"):
            model(ids, labels, mask, rewards, return_stats=True)


# ------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_is_float32_for_every_input_dtype(dtype, reduction):
    hidden = torch.randn(B, T, H, D, dtype=dtype)
    loss = fused_weighted_mtp_loss(hidden, torch.randn(V, D, dtype=dtype), torch.randint(0, V, (B, T)))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    logits = torch.randn(B, T, H, V, dtype=dtype)
    loss = weighted_mtp_cross_entropy(logits, torch.randint(0, V, (B, T)), reduction=reduction)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_float32_weight_with_bfloat16_hidden(bias, reduction):
    """Under autocast the head states are bf16 and lm_head.weight a float32 parameter: no cast of the
    weight, its gradient in float32, values as a float32 computation on the bf16 hidden states."""
    torch.manual_seed(0)
    model = TinyMTP(bias=bias)
    ids, labels, mask, rewards = make_batch(0, prompt=2, pad=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.hidden_and_values(ids)[0] @ torch.eye(D)  # an autocast GEMM: bf16 out
        assert hidden.dtype == torch.bfloat16 and model.head.weight.dtype == torch.float32
        hidden.retain_grad()
        loss = fused_weighted_mtp_loss(
            hidden, model.head.weight, labels, mask, lm_head_bias=model.head.bias, reduction=reduction
        )
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert model.head.weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    truth_hidden = hidden.detach().double().requires_grad_()
    weight = model.head.weight.detach().double().requires_grad_()
    b = None if model.head.bias is None else model.head.bias.detach().double()
    truth = ref.weighted_mtp_loss_from_hidden(
        truth_hidden, weight, labels, mask, lm_head_bias=b, reduction=reduction
    )
    truth.sum().backward()
    torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.head.weight.grad.double(), weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), truth_hidden.grad, rtol=1e-2, atol=1e-3)


def test_mismatched_dtypes_other_than_autocast_are_refused():
    with pytest.raises(TypeError, match="autocast"):
        fused_weighted_mtp_loss(
            torch.randn(B, T, H, D), torch.randn(V, D).bfloat16(), torch.zeros(B, T).long()
        )


# -------------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize(
    "use_reentrant, reduction, runs",
    [(False, "mean", 1), (True, "mean", 2), (False, "none", 2), (True, "none", 2)],
    ids=["non-reentrant", "reentrant", "non-reentrant none", "reentrant none"],
)
def test_activation_checkpointing_runs_the_loss_at_most_twice(monkeypatch, use_reentrant, reduction, runs):
    """Non-reentrant checkpointing never recomputes mean / sum (nothing is saved for backward); the
    reentrant mode always re-runs its region once (its first pass runs without grad: forward only)."""
    calls = []
    original = linear_op.forward
    monkeypatch.setattr(linear_op, "forward", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    model = TinyMTP(bias=True)
    batch = make_batch(0, prompt=2, pad=1)
    expected = loss_and_grads(model, batch, reduction=reduction)
    calls.clear()

    def region(x):  # the head states and the values (from the value head) require grad
        return model.loss_from_embeddings(x, *batch[1:], reduction=reduction)

    model.zero_grad()
    loss = checkpoint(region, model.emb(batch[0]), use_reentrant=use_reentrant)
    loss.sum().backward()
    assert len(calls) == runs
    assert_same((loss.detach(), [p.grad for p in model.parameters()]), expected)


# ------------------------------------------------------------------------------- accumulation


def test_count_mtp_targets_matches_the_row_layout():
    _, labels, mask, _ = make_batch(3, prompt=3, pad=4)
    counts = count_mtp_targets(labels, mask, n_heads=T + 2)
    expected = [int(ref.head_valid_mask(labels, mask, k, ref.IGNORE_INDEX).sum()) for k in range(1, T + 3)]
    assert counts.dtype == torch.int64 and counts.tolist() == expected
    assert counts[-3:].tolist() == [0, 0, 0]  # heads beyond T - 1 have no target
    with pytest.raises(ValueError, match="n_heads"):
        count_mtp_targets(labels, mask, n_heads=0)


def test_accumulation_with_global_target_counts_equals_the_big_batch():
    """The documented recipe: counts of the whole batch -> target_counts of every micro-batch."""
    torch.manual_seed(0)
    model = TinyMTP(bias=True).double()
    ids, labels, mask, rewards = make_batch(5, prompt=2, pad=0, batch=4)
    labels[0, :6] = ref.IGNORE_INDEX  # a long prompt and heavy padding: unequal valid counts
    mask[3, 3:] = 0
    big = loss_and_grads(model, (ids, labels, mask, rewards))

    micro = [slice(0, 1), slice(1, 4)]
    counts = sum(count_mtp_targets(labels[s], mask[s], n_heads=H) for s in micro)  # all_reduce across ranks
    model.zero_grad()
    total = 0.0
    for s in micro:
        loss = model(ids[s], labels[s], mask[s], rewards[s], target_counts=counts)
        loss.backward()
        total = total + loss.detach()
    accumulated = (total, [p.grad.clone() for p in model.parameters()])
    assert_same(accumulated, big, atol=1e-6)

    mean_of_means = sum(model(ids[s], labels[s], mask[s], rewards[s]).detach() for s in micro) / len(micro)
    assert (mean_of_means - big[0]).abs() > 1e-2  # the naive recipe is measurably off


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"target_counts": torch.ones(H + 1)}, ["target_counts", f"[{H}]"]),
        ({"target_counts": torch.ones(H), "reduction": "sum"}, ["target_counts", "mean"]),
    ],
)
def test_target_counts_bad_inputs(kwargs, words):
    with pytest.raises(ValueError) as info:
        fused_weighted_mtp_loss(
            torch.randn(B, T, H, D), torch.randn(V, D), torch.zeros(B, T).long(), **kwargs
        )
    assert all(w in str(info.value) for w in words), str(info.value)


# ------------------------------------------------------------------------------- second order


@pytest.mark.parametrize("entry", ["hidden", "logits"])
def test_create_graph_is_refused(entry):
    if entry == "hidden":
        x = torch.randn(B, T, H, D, requires_grad=True)
        loss = fused_weighted_mtp_loss(x, torch.randn(V, D), torch.zeros(B, T).long())
    else:
        x = torch.randn(B, T, H, V, requires_grad=True)
        loss = weighted_mtp_cross_entropy(x, torch.zeros(B, T).long(), inplace=False)
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(loss, x, create_graph=True)


# ------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("entry", ["hidden", "logits"])
def test_backward_allocates_no_gradient_sized_zeros(entry):
    """The gradients travel as non-differentiable outputs: autograd must not materialise zero
    "gradients" for them (a [V, d] or [B, T, H, V] allocation in backward)."""
    from torch.profiler import profile

    big_v = 4096
    if entry == "hidden":
        x = torch.randn(B, T, H, D, requires_grad=True)
        weight = torch.randn(big_v, D, requires_grad=True)
        size = weight.numel() * 4
        step = lambda: fused_weighted_mtp_loss(x, weight, torch.zeros(B, T).long()).backward()  # noqa: E731
    else:
        x = torch.randn(B, T, H, big_v, requires_grad=True)
        size = x.numel() * 4
        step = lambda: weighted_mtp_cross_entropy(x, torch.zeros(B, T).long(), inplace=False).backward()  # noqa: E731
    with profile(profile_memory=True) as prof:
        step()
    zeros = [
        e
        for e in prof.events()
        if e.name in ("aten::zeros", "aten::zeros_like") and e.cpu_memory_usage >= size
    ]
    assert not zeros, [(e.name, e.cpu_memory_usage) for e in zeros]
