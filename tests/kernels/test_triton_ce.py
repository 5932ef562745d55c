"""Parity of the Triton chunk primitive: interpreted on CPU tensors, or compiled on CUDA when there is one.

``tests/kernels/conftest.py`` sets ``TRITON_INTERPRET=1`` when there is no GPU. Ground truth: float64
softmax / cross-entropy of the same (dtype-rounded) logits, and float64 weights from
``reference.compute_td_errors`` + ``reference.build_weights`` gathered at ``(row_b, row_j)``.
"""

import pytest
import torch
import triton

from wmtp_kernels import reference
from wmtp_kernels._rows import TDRowInputs
from wmtp_kernels._triton_ce import _weighted_ce_rows_kernel, launch_config, weighted_ce_chunk_

pytestmark = pytest.mark.triton

COMPILED = isinstance(_weighted_ce_rows_kernel, triton.runtime.JITFunction)
if COMPILED and not torch.cuda.is_available():
    pytest.skip(
        "wmtp_kernels._triton_ce was imported before TRITON_INTERPRET=1 was set and there is no GPU",
        allow_module_level=True,
    )
DEVICE = torch.device("cuda" if COMPILED else "cpu")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def truth_ce_and_grad(logits, targets, scale, weights):
    """float64 ce and gradient ``(softmax - onehot) * w * scale``; zero rows where ``scale == 0``."""
    logits, targets, scale, weights = (t.cpu() for t in (logits, targets, scale, weights))
    x = logits.double()
    live = scale != 0
    lse = torch.logsumexp(torch.where(live[:, None], x, 0.0), dim=1)
    safe_targets = torch.where(live, targets, 0)
    ce = torch.where(live, lse - x.gather(1, safe_targets[:, None]).squeeze(1), 0.0)
    grad = torch.softmax(torch.where(live[:, None], x, 0.0), dim=1)
    grad[torch.arange(len(targets)), safe_targets] -= 1
    grad = torch.where(live[:, None], grad * (weights.double() * scale.double())[:, None], 0.0)
    return ce, grad


def assert_grad_close(actual, truth, dtype):
    """Within one rounding of ``dtype`` plus float32 softmax error (5e-6 relative) of the float64 truth.

    ``exp(x - lse)`` inherits the absolute float32 error of ``lse`` (a few 1e-7 for |lse| ~ 10), hence the
    float32 term; the tiny absolute term covers entries that are zero in the truth.
    """
    bound = (torch.finfo(dtype).eps + 5e-6) * truth.abs() + 1e-7 * truth.abs().max()
    err = (actual.cpu().double() - truth).abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"gradient mismatch at flat index {int(worst)}: got {actual.flatten()[worst].item()}, "
        f"want {truth.flatten()[worst].item()} (max err {err.max().item():.3g})"
    )


def make_rows(rows, vocab, dtype):
    logits = (torch.randn(rows, vocab) * 3).to(dtype)
    targets = torch.randint(0, vocab, (rows,))
    scale = torch.rand(rows) + 0.25
    return logits.to(DEVICE), targets.to(DEVICE), scale.to(DEVICE)


def on_device(*tensors):
    return tuple(t.to(DEVICE) for t in tensors)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 123, 300, 4097, 9000])
def test_weights_mode_matches_float64_truth(dtype, vocab):
    rows = 6
    logits, targets, scale = make_rows(rows, vocab, dtype)
    scale[2] = 0.0
    targets[2] = -100  # never read: scale 0 rows skip the loss work
    logits[2] = float("nan")
    # the row maximum in the last tile, then in the first: the online max must rescale the sum.
    logits[0, -1] = 40.0
    logits[1, 0] = 40.0
    weights = torch.tensor([0.1, 5.0, 1.0, 0.37, 2.5, 1.0], device=DEVICE)
    ce_truth, grad_truth = truth_ce_and_grad(logits, targets, scale, weights)

    ce, row_weight = weighted_ce_chunk_(logits, targets, scale, weights, None)

    torch.testing.assert_close(ce.cpu().double(), ce_truth, rtol=1e-5, atol=1e-5)
    assert torch.equal(row_weight, weights)
    assert logits.dtype == dtype
    assert_grad_close(logits, grad_truth, dtype)
    assert bool((logits[2] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_view_with_stride_larger_than_vocab(dtype):
    rows, vocab, pad = 5, 123, 17
    storage = (torch.randn(rows, vocab + pad) * 2).to(dtype).to(DEVICE)
    before = storage.clone()
    logits = storage[:, 5 : 5 + vocab]
    targets, scale, weights = on_device(
        torch.randint(0, vocab, (rows,)), torch.full((rows,), 0.5), torch.rand(rows) * 3
    )
    ce_truth, grad_truth = truth_ce_and_grad(logits, targets, scale, weights)

    ce, _ = weighted_ce_chunk_(logits, targets, scale, weights, None)

    torch.testing.assert_close(ce.cpu().double(), ce_truth, rtol=1e-5, atol=1e-5)
    assert_grad_close(storage[:, 5 : 5 + vocab], grad_truth, dtype)
    assert torch.equal(storage[:, :5], before[:, :5])
    assert torch.equal(storage[:, 5 + vocab :], before[:, 5 + vocab :])


def padded_mask(lengths, seq, left):
    positions = torch.arange(seq)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    return positions >= seq - lengths if left else positions < lengths


@pytest.mark.parametrize("terminal", ["last_state", "last_transition"])
@pytest.mark.parametrize("left_padding", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_td_mode_matches_reference_weights(terminal, left_padding, dtype):
    batch, seq, vocab = 5, 7, 37
    mask = padded_mask([7, 4, 1, 0, 5], seq, left_padding)
    mask[4, 3] = False  # a hole: no bootstrap across it
    values = torch.randn(batch, seq)
    values[0, :3] = torch.tensor([3.0, -3.0, 3.0])  # td -5.7 then +5.7: weights clip at both ends
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    gamma, beta, min_weight, max_weight = 0.9, 0.5, 0.1, 5.0
    # every (b, j) pair is a row, so j == last, j == last - 1, j == T - 1 and padding are all covered.
    grid = torch.meshgrid(torch.arange(batch), torch.arange(seq), indexing="ij")
    row_b, row_j = (g.flatten() for g in grid)
    rows = batch * seq
    logits, targets, scale = make_rows(rows, vocab, dtype)
    scale[::5] = 0.0
    td_truth = reference.compute_td_errors(values.double(), rewards.double(), mask, gamma, terminal)
    weights_truth = reference.build_weights(td_truth, beta, min_weight, max_weight)[row_b, row_j]
    assert bool((weights_truth == min_weight).any()) and bool((weights_truth == max_weight).any())
    last = reference.last_token_index(mask)
    td = TDRowInputs(
        *on_device(values, rewards, mask, last, row_b, row_j), gamma, beta, min_weight, max_weight, terminal
    )
    original = logits.clone()

    ce, row_weight = weighted_ce_chunk_(logits, targets, scale, None, td)

    # float32 values carry ~1e-7 absolute error into td, so the weights are compared at 1e-5, and the
    # gradient against the truth built with the weights the kernel reports having used.
    torch.testing.assert_close(row_weight.cpu().double(), weights_truth, rtol=1e-5, atol=1e-6)
    ce_truth, grad_truth = truth_ce_and_grad(original, targets, scale, row_weight)
    torch.testing.assert_close(ce.cpu().double(), ce_truth, rtol=1e-5, atol=1e-5)
    assert_grad_close(logits, grad_truth, dtype)


def test_td_mode_accepts_int8_mask_and_gamma_one():
    values = torch.tensor([[0.5, 0.7, 0.9]])
    mask = torch.ones(1, 3, dtype=torch.int8)
    td = TDRowInputs(
        *on_device(
            values,
            torch.tensor([1.0]),
            mask,
            torch.tensor([2]),
            torch.zeros(3, dtype=torch.int64),
            torch.arange(3),
        ),
        1.0,
        0.9,
        0.1,
        5.0,
        "last_state",
    )
    logits, targets, scale = make_rows(3, 11, torch.float32)

    _, row_weight = weighted_ce_chunk_(logits, targets, scale, None, td)

    # worked example of docs/DESIGN.md: td = [0.2, 0.2, 0.1] -> weights exp(td / 0.9)
    want = torch.exp(torch.tensor([0.2, 0.2, 0.1]) / 0.9)
    torch.testing.assert_close(row_weight.cpu(), want, rtol=1e-5, atol=0)


def test_out_of_range_row_indices_read_nothing():
    values = torch.randn(2, 3)
    td = TDRowInputs(
        *on_device(
            values,
            torch.ones(2),
            torch.ones(2, 3, dtype=torch.bool),
            torch.tensor([2, 2]),
            torch.tensor([0, 5, 1]),
            torch.tensor([7, 0, -1]),
        ),
        1.0,
        0.9,
        0.1,
        5.0,
        "last_state",
    )
    logits, targets, scale = make_rows(3, 5, torch.float32)

    _, row_weight = weighted_ce_chunk_(logits, targets, scale, None, td)

    assert torch.equal(row_weight.cpu(), torch.ones(3))  # td = 0 -> exp(0) = 1


def test_empty_chunk_returns_empty_outputs():
    ce, row_weight = weighted_ce_chunk_(
        *on_device(torch.empty(0, 9), torch.empty(0, dtype=torch.int64), torch.empty(0), torch.empty(0)), None
    )
    assert ce.shape == (0,) and row_weight.shape == (0,)


def test_launch_config_tiles_are_powers_of_two_within_bounds():
    for vocab in (1, 7, 123, 300, 4097, 32000, 128256):
        block_v, num_warps = launch_config(vocab)
        assert block_v & (block_v - 1) == 0 and block_v <= 4096
        assert block_v >= min(vocab, 4096)
        assert num_warps in (1, 2, 4, 8)


# The argument checks are device independent; their cases are CPU tensors, which the compiled kernel
# refuses before any other check.
cpu_only = pytest.mark.skipif(COMPILED, reason="argument-check cases are CPU tensors")


def _valid_args():
    logits, targets, scale = make_rows(3, 5, torch.float32)
    return {"logits": logits, "targets": targets, "scale": scale, "weights": torch.ones(3), "td": None}


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"logits": torch.randn(5, 3).t()}, ValueError, "contiguous along V"),
        ({"logits": torch.randn(1, 5).expand(3, 5)}, ValueError, "overlap"),
        ({"logits": torch.randn(3, 5, dtype=torch.float64)}, TypeError, "float32, bfloat16"),
        ({"logits": torch.randn(15)}, ValueError, r"\[C, V\]"),
        ({"targets": torch.zeros(3, dtype=torch.int32)}, TypeError, "targets"),
        ({"targets": torch.zeros(4, dtype=torch.int64)}, ValueError, r"targets must have shape \[C\]"),
        ({"scale": torch.ones(3, dtype=torch.float64)}, TypeError, "scale"),
        ({"weights": None}, ValueError, "exactly one of weights and td"),
        ({"weights": torch.ones(2)}, ValueError, "weights must have shape"),
    ],
)
@cpu_only
def test_bad_inputs_raise_clear_errors(change, error, match):
    args = _valid_args() | change
    with pytest.raises(error, match=match):
        weighted_ce_chunk_(**args)


def _td(**change):
    base = {
        "values": torch.randn(2, 4),
        "rewards": torch.ones(2),
        "mask": torch.ones(2, 4, dtype=torch.bool),
        "last": torch.tensor([3, 3]),
        "row_b": torch.zeros(3, dtype=torch.int64),
        "row_j": torch.zeros(3, dtype=torch.int64),
        "gamma": 1.0,
        "beta": 0.9,
        "min_weight": 0.1,
        "max_weight": 5.0,
        "terminal": "last_state",
    }
    return TDRowInputs(**(base | change))


@pytest.mark.parametrize(
    ("td", "error", "match"),
    [
        (_td(values=torch.randn(2, 4, dtype=torch.float64)), TypeError, "td.values must be float32"),
        (_td(values=torch.randn(4, 2).t()), ValueError, "td.values must be contiguous"),
        (_td(mask=torch.ones(2, 4)), TypeError, "td.mask"),
        (_td(mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "td.mask must have shape"),
        (_td(rewards=torch.ones(3)), ValueError, "td.rewards"),
        (_td(last=torch.tensor([3, 3], dtype=torch.int32)), TypeError, "td.last"),
        (_td(row_j=torch.zeros(2, dtype=torch.int64)), ValueError, "td.row_j"),
        (_td(terminal="end"), ValueError, "terminal"),
        (_td(beta=0.0), ValueError, "beta"),
    ],
)
@cpu_only
def test_bad_td_inputs_raise_clear_errors(td, error, match):
    args = _valid_args() | {"weights": None, "td": td}
    with pytest.raises(error, match=match):
        weighted_ce_chunk_(**args)
