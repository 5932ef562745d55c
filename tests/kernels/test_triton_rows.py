"""The Triton row kernels plan the same rows as the PyTorch row layout (compiled on CUDA, else the
interpreter)."""

import math

import pytest
import torch

from wmtp_kernels._rows import build_row_layout, gather_row_weights, row_scale
from wmtp_kernels._validation import data_problem_counts

pytestmark = pytest.mark.triton

triton_rows = pytest.importorskip("wmtp_kernels._triton_rows")

IGNORE = -100
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed, batch, seq, padding, vocab=11):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < 0.2] = IGNORE
    mask = None
    if padding != "none":
        lengths = torch.randint(0, seq + 1, (batch,), generator=g)
        pos = torch.arange(seq)[None, :]
        mask = pos < lengths[:, None] if padding == "right" else pos >= seq - lengths[:, None]
        if padding == "holes":
            mask = torch.rand(batch, seq, generator=g) < 0.7
        mask = mask.long()
    weights = torch.rand(batch, seq, generator=g, dtype=torch.float64) * 2
    rewards = torch.rand(batch, generator=g)
    return tuple(None if t is None else t.to(DEVICE) for t in (labels, mask, weights, rewards))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("batch", "seq", "heads"), [(1, 1, 1), (2, 2, 4), (3, 9, 3), (2, 13, 4)])
@pytest.mark.parametrize("padding", ["none", "right", "left", "holes"])
def test_kernel_plan_matches_the_row_layout(seed, batch, seq, heads, padding):
    labels, mask, weights, rewards = _case(seed, batch, seq, padding)
    layout = build_row_layout(labels, mask, heads, IGNORE)
    rows = layout.valid_rows()
    n = rows.numel()
    for source in ("uniform", "weights", "td"):
        for mean, target_counts in (
            (True, None),
            (True, torch.tensor([7, 0, 3, 5], device=DEVICE)[:heads]),
            (False, None),
        ):
            got = triton_rows.plan_rows(
                labels, mask, heads, 11, IGNORE, source, weights, rewards, target_counts, mean, block_rows=16
            )
            assert got.counts.tolist() == [n, 0, 0, *layout.head_counts.tolist()]
            torch.testing.assert_close(got.rows[:n], rows, rtol=0, atol=0)
            torch.testing.assert_close(got.targets[:n], layout.targets[rows], rtol=0, atol=0)
            want_scale = row_scale(layout, "mean" if mean else "sum", torch.float32, target_counts)[rows]
            torch.testing.assert_close(got.scale[:n], want_scale, rtol=1e-7, atol=0)
            if source == "weights":
                want = gather_row_weights(layout, weights, rows)
                torch.testing.assert_close(got.weights[:n], want, rtol=0, atol=0)
            else:
                assert got.weights is None
            if source == "td":
                torch.testing.assert_close(got.row_b[:n], layout.row_b[rows], rtol=0, atol=0)
                torch.testing.assert_close(got.row_j[:n], layout.row_j[rows], rtol=0, atol=0)
            else:
                assert got.row_b is None and got.row_j is None


@pytest.mark.parametrize("labels_dtype", [torch.int64, torch.int32])
def test_kernel_counts_bad_labels_and_rewards_as_the_data_checks_do(labels_dtype):
    labels, mask, weights, rewards = _case(5, 3, 40, "right")
    labels[0, 0], labels[1, 7], labels[2, 39], labels[2, 3] = -1, 11, 500, IGNORE
    rewards[1], rewards[2] = math.nan, -math.inf
    labels = labels.to(labels_dtype)
    got = triton_rows.plan_rows(
        labels, mask, 4, 11, IGNORE, "uniform", None, rewards, None, True, block_rows=32
    )
    assert got.counts[1:3].tolist() == data_problem_counts(labels, 11, IGNORE, rewards).tolist() == [3, 2]
