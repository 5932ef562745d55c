"""CUDA parity of the compiled Triton path with the reference (``pytest -m gpu``; skipped without a GPU).

Rule as in ``test_mtp_loss.py``: against a float64 ground truth (the reference on CPU), the error of the
Triton path on CUDA is no worse than the same-dtype reference's on CUDA plus a small slack. Covered: float32
and bfloat16, both weight sources (weights; values + rewards with both terminal modes), both padding
sides, odd vocabularies that hit every launch configuration of the chunk kernel, T < H, one and many
chunks, ``reduction="none"``, the from-logits API, and a chunk of more than 2**31 logits.
"""

from functools import partial

import pytest
import torch
from _compare import assert_no_worse
from test_mtp_loss import DIFFERENTIABLE, make_case

from wmtp_kernels import fused_weighted_mtp_loss, weighted_mtp_cross_entropy
from wmtp_kernels import reference as ref
from wmtp_kernels._triton_ce import MAX_BLOCK_V, launch_config

# One vocabulary per launch configuration of the chunk kernel (num_warps; one tile or several), none a
# power of two (the last tile is masked).
VOCABS = [37, 200, 1000, 4000, 50257]
DEVICE = "cuda"


def _inputs(case, dtype, device):
    inputs = {}
    for name, t in case.items():
        if t.is_floating_point():
            t = t.to(device, dtype).requires_grad_(name in DIFFERENTIABLE)
        inputs[name] = t.to(device)
    return inputs


def run_on(device, fn, case, dtype, reduction, **kwargs):
    """Loss, stats and the gradients of every differentiable input (moved back to the CPU)."""
    inputs = _inputs(case, dtype, device)
    loss, stats = fn(**inputs, reduction=reduction, return_stats=True, **kwargs)
    g = torch.Generator().manual_seed(1)
    grad_out = (torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5).to(device, loss.dtype)
    names = [n for n in DIFFERENTIABLE if n in inputs]
    grads = torch.autograd.grad(loss, [inputs[n] for n in names], grad_out)
    return loss.detach().cpu(), stats, {n: gr.cpu() for n, gr in zip(names, grads)}


def check_cuda_parity(case, dtype, reduction, **kwargs):
    options = {k: kwargs.pop(k) for k in ("terminal", "gamma", "beta") if k in kwargs}
    truth = run_on("cpu", ref.weighted_mtp_loss_from_hidden, case, torch.float64, reduction, **options)
    same = run_on(DEVICE, ref.weighted_mtp_loss_from_hidden, case, dtype, reduction, **options)
    ours = run_on(DEVICE, fused_weighted_mtp_loss, case, dtype, reduction, impl="triton", **options, **kwargs)
    assert ours[0].dtype == torch.float32  # the loss is float32 for every input dtype
    assert all(g.dtype == dtype for g in ours[2].values())
    assert_no_worse("loss", ours[0], same[0], truth[0])
    for name in truth[2]:
        assert_no_worse(f"grad {name}", ours[2][name], same[2][name], truth[2][name])
    for key, value in truth[1].items():
        assert ours[1][key] == pytest.approx(value, rel=1e-2, abs=1e-2), key


def _configuration(vocab):
    return launch_config(vocab)[1], vocab > MAX_BLOCK_V


def test_vocabs_cover_every_launch_configuration():
    every = {_configuration(v) for v in range(1, 2 * MAX_BLOCK_V + 2)}
    missed = every - {_configuration(v) for v in VOCABS}
    assert not missed, f"VOCABS miss the launch configurations (num_warps, multi-tile) {missed}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("source", ["weights", "last_state", "last_transition"])
def test_triton_matches_reference(dtype, reduction, padding, source):
    kind = "weights" if source == "weights" else "values"
    case = make_case(B=3, T=11, H=4, d=32, V=1000, padding=padding, source=kind)
    terminal = {} if source == "weights" else {"terminal": source, "gamma": 0.9, "beta": 0.5}
    check_cuda_parity(case, dtype, reduction, chunk_size=7, **terminal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", VOCABS)
def test_every_launch_configuration(dtype, vocab):
    case = make_case(B=2, T=6, H=3, d=16, V=vocab, source="values", bias=True)
    check_cuda_parity(case, dtype, "sum", chunk_size=5)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape, chunk_size",
    [
        ({"B": 2, "T": 2, "H": 4, "d": 8, "V": 123}, None),  # T < H: heads 2..4 have no target
        ({"B": 3, "T": 9, "H": 1, "d": 8, "V": 64}, 4),  # next-token prediction
        ({"B": 2, "T": 64, "H": 4, "d": 256, "V": 32000}, None),  # default chunk, one chunk
    ],
    ids=["T<H", "H=1", "V=32000"],
)
def test_odd_shapes(shape, chunk_size):
    case = make_case(**shape, source="values")
    check_cuda_parity(case, torch.bfloat16, "mean", chunk_size=chunk_size)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("source", ["weights", "values"])
def test_from_logits_api(dtype, source):
    case = make_case(B=2, T=9, H=4, d=8, V=5000, source=source, padding="left")
    logits = torch.randn(2, 9, 4, 5000, dtype=torch.float64) * 3
    for name in ("hidden", "lm_head_weight"):
        del case[name]
    ours = partial(weighted_mtp_cross_entropy, impl="triton", inplace=False, chunk_size=7)
    results = []
    for device, dtype_, fn in [("cpu", torch.float64, ref.weighted_mtp_cross_entropy),
                               (DEVICE, dtype, ref.weighted_mtp_cross_entropy),
                               (DEVICE, dtype, ours)]:  # fmt: skip
        x = logits.to(device, dtype_).requires_grad_()
        inputs = _inputs(case, dtype_, device)
        loss = fn(x, **inputs, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss.detach().cpu(), grad.cpu()))
    (t_loss, t_grad), (s_loss, s_grad), (o_loss, o_grad) = results
    assert_no_worse("loss", o_loss, s_loss, t_loss)
    assert_no_worse("grad logits", o_grad, s_grad, t_grad)


@pytest.mark.gpu
def test_chunk_of_more_than_2_31_logits():
    """One chunk of 16790 rows x V = 128256 (2.15e9 logits): row offsets must not overflow int32."""
    batch, seq, heads, dim, vocab = 1, 4200, 4, 16, 128256
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(batch, seq, heads, dim, generator=g).cuda().bfloat16().requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) / dim**0.5).cuda().bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g).cuda()
    valid_rows = batch * sum(seq - k for k in range(1, heads + 1))
    assert valid_rows * vocab > 2**31
    ours = fused_weighted_mtp_loss(hidden, weight, labels, chunk_size=batch * seq * heads)
    grads = torch.autograd.grad(ours, [hidden, weight])
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    truth = ref.weighted_mtp_loss_from_hidden(h32, w32, labels)
    truth_grads = torch.autograd.grad(truth, [h32, w32])
    torch.testing.assert_close(ours.float(), truth, rtol=2e-3, atol=2e-3)
    for name, got, want in zip(["hidden", "weight"], grads, truth_grads):
        err = (got.float() - want).abs().max().item()
        assert err <= 2e-2 * want.abs().max().item(), f"grad {name}: max error {err:.3g}"
