"""Table-driven bad-input campaign: every public entry point names the argument and the shapes/dtypes."""

from functools import partial

import pytest
import torch

import wmtp_kernels
from wmtp_kernels import reference as ref

B, T, H, D, V = 2, 5, 3, 8, 11


def hidden_args(**overrides):
    args = {
        "hidden": torch.randn(B, T, H, D),
        "lm_head_weight": torch.randn(V, D),
        "labels": torch.randint(0, V, (B, T)),
    }
    args.update(overrides)
    return args


def logits_args(**overrides):
    args = {"logits": torch.randn(B, T, H, V), "labels": torch.randint(0, V, (B, T))}
    args.update(overrides)
    return args


VALUES = {"values": torch.rand(B, T), "rewards": torch.ones(B)}

# (case id, keyword overrides, expected error type, words the message must contain)
SHARED_CASES = [
    ("float labels", {"labels": torch.zeros(B, T)}, TypeError, ["labels", "dtype"]),
    ("bool labels", {"labels": torch.zeros(B, T, dtype=torch.bool)}, TypeError, ["labels", "dtype"]),
    (
        "labels shape",
        {"labels": torch.zeros(B, T + 1, dtype=torch.long)},
        ValueError,
        ["labels", f"[{B}, {T}]"],
    ),
    ("labels 1-d", {"labels": torch.zeros(B * T, dtype=torch.long)}, ValueError, ["labels", f"[{B * T}]"]),
    ("label == V", {"labels": torch.full((B, T), V)}, ValueError, ["labels", f"[0, {V})"]),
    ("label negative", {"labels": torch.full((B, T), -1)}, ValueError, ["labels", "ignore_index"]),
    (
        "label vs custom ignore",
        {"labels": torch.full((B, T), -100), "ignore_index": -1},
        ValueError,
        ["labels"],
    ),
    ("mask shape", {"attention_mask": torch.ones(B, T - 1)}, ValueError, ["attention_mask", f"[{B}, {T}]"]),
    ("mask transposed", {"attention_mask": torch.ones(T, B)}, ValueError, ["attention_mask"]),
    ("mask not tensor", {"attention_mask": [[1] * T] * B}, TypeError, ["attention_mask"]),
    ("weights shape", {"weights": torch.ones(B, T, H)}, ValueError, ["weights", f"[{B}, {T}]"]),
    ("weights int", {"weights": torch.ones(B, T, dtype=torch.long)}, TypeError, ["weights", "dtype"]),
    ("weights and values", {"weights": torch.ones(B, T), **VALUES}, ValueError, ["weights", "values"]),
    ("values without rewards", {"values": torch.rand(B, T)}, ValueError, ["values", "rewards"]),
    ("rewards without values", {"rewards": torch.ones(B)}, ValueError, ["values", "rewards"]),
    ("values shape", {"values": torch.rand(B, T + 2), "rewards": torch.ones(B)}, ValueError, ["values"]),
    (
        "values int",
        {"values": torch.ones(B, T, dtype=torch.long), "rewards": torch.ones(B)},
        TypeError,
        ["values"],
    ),
    (
        "rewards shape",
        {"values": torch.rand(B, T), "rewards": torch.ones(B, 1)},
        ValueError,
        ["rewards", f"[{B}]"],
    ),
    (
        "rewards int",
        {"values": torch.rand(B, T), "rewards": torch.ones(B, dtype=torch.long)},
        TypeError,
        ["rewards"],
    ),
    (
        "rewards NaN",
        {"values": torch.rand(B, T), "rewards": torch.tensor([1.0, float("nan")])},
        ValueError,
        ["rewards", "[2]", "holds 1 non-finite"],
    ),
    (
        "rewards Inf",
        {"values": torch.rand(B, T), "rewards": torch.tensor([float("inf"), 0.0])},
        ValueError,
        ["rewards", "non-finite"],
    ),
    ("reduction", {"reduction": "average"}, ValueError, ["reduction", "average"]),
    ("terminal", {"terminal": "final"}, ValueError, ["terminal", "final"]),
    ("beta zero", {"beta": 0.0}, ValueError, ["beta"]),
    ("beta negative", {"beta": -1.0}, ValueError, ["beta"]),
    ("min > max", {"min_weight": 3.0, "max_weight": 2.0}, ValueError, ["min_weight", "max_weight"]),
    ("negative min", {"min_weight": -0.5}, ValueError, ["min_weight"]),
]

HIDDEN_CASES = [
    ("integer hidden", {"hidden": torch.ones(B, T, H, D, dtype=torch.long)}, TypeError, ["hidden", "dtype"]),
    ("hidden 3-d", {"hidden": torch.randn(B, T, D)}, ValueError, ["hidden", "[B, T, H, d]"]),
    (
        "empty batch",
        {"hidden": torch.randn(0, T, H, D), "labels": torch.zeros(0, T, dtype=torch.long)},
        ValueError,
        ["empty"],
    ),
    (
        "empty sequence",
        {"hidden": torch.randn(B, 0, H, D), "labels": torch.zeros(B, 0, dtype=torch.long)},
        ValueError,
        ["empty"],
    ),
    (
        "weight d mismatch",
        {"lm_head_weight": torch.randn(V, D + 1)},
        ValueError,
        ["lm_head_weight", f"d = {D}"],
    ),
    ("weight 1-d", {"lm_head_weight": torch.randn(V)}, ValueError, ["lm_head_weight", "[V, d]"]),
    (
        "weight dtype",
        {"lm_head_weight": torch.randn(V, D, dtype=torch.float64)},
        TypeError,
        ["lm_head_weight", "dtype"],
    ),
    ("bias shape", {"lm_head_bias": torch.randn(V + 1)}, ValueError, ["lm_head_bias", f"[{V}]"]),
    ("bias int", {"lm_head_bias": torch.ones(V, dtype=torch.long)}, TypeError, ["lm_head_bias"]),
]

LOGITS_CASES = [
    ("integer logits", {"logits": torch.ones(B, T, H, V, dtype=torch.long)}, TypeError, ["logits", "dtype"]),
    ("logits 3-d", {"logits": torch.randn(B, T, V)}, ValueError, ["logits", "[B, T, H, V]"]),
    (
        "empty logits",
        {"logits": torch.randn(0, T, H, V), "labels": torch.zeros(0, T, dtype=torch.long)},
        ValueError,
        ["empty"],
    ),
]


def check_message(info, words):
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in error message: {message}"


@pytest.mark.parametrize(
    "fn",
    [
        ref.weighted_mtp_loss_from_hidden,
        wmtp_kernels.fused_weighted_mtp_loss,
        partial(wmtp_kernels.fused_weighted_mtp_loss, impl="triton"),  # the row kernels count bad data
    ],
    ids=["reference", "fused", "fused-triton"],
)
@pytest.mark.parametrize(
    "case, overrides, error, words",
    SHARED_CASES + HIDDEN_CASES,
    ids=[c[0] for c in SHARED_CASES + HIDDEN_CASES],
)
def test_hidden_entry_points_reject(fn, case, overrides, error, words):
    with pytest.raises(error) as info:
        fn(**hidden_args(**overrides))
    check_message(info, words)


@pytest.mark.parametrize(
    "fn",
    [ref.weighted_mtp_cross_entropy, wmtp_kernels.weighted_mtp_cross_entropy],
    ids=["reference", "kernel"],
)
@pytest.mark.parametrize(
    "case, overrides, error, words",
    SHARED_CASES + LOGITS_CASES,
    ids=[c[0] for c in SHARED_CASES + LOGITS_CASES],
)
def test_logits_entry_points_reject(fn, case, overrides, error, words):
    with pytest.raises(error) as info:
        fn(**logits_args(**overrides))
    check_message(info, words)


@pytest.mark.parametrize("module", [ref, wmtp_kernels], ids=["reference", "production"])
@pytest.mark.parametrize(
    "name, args, error, words",
    [
        ("compute_td_errors", (torch.rand(B), torch.ones(B)), ValueError, ["values", "[B, T]"]),
        ("compute_td_errors", (torch.rand(B, T, 2), torch.ones(B)), ValueError, ["values"]),
        ("compute_td_errors", (torch.rand(B, T), torch.ones(B + 1)), ValueError, ["rewards", f"[{B}]"]),
        (
            "value_loss",
            (torch.rand(B, T), torch.tensor([0.0, float("nan")])),
            ValueError,
            ["rewards", "finite"],
        ),
        (
            "compute_td_errors",
            (torch.rand(B, T), torch.ones(B), torch.ones(B, T + 1)),
            ValueError,
            ["attention_mask"],
        ),
        ("build_weights", (torch.ones(3, dtype=torch.long),), TypeError, ["td_errors", "dtype"]),
        ("build_weights", (torch.ones(3), 0.0), ValueError, ["beta"]),
        (
            "value_loss",
            (torch.rand(B, T), torch.ones(B), None, torch.rand(B, T + 1), 0.2),
            ValueError,
            ["old_values"],
        ),
        (
            "value_loss",
            (torch.rand(B, T), torch.ones(B), None, torch.rand(B, T), -0.2),
            ValueError,
            ["clip_range"],
        ),
        (
            "value_loss",
            (torch.rand(B, T), torch.ones(B), None, None, None, "l1"),
            ValueError,
            ["loss_type"],
        ),
        ("explained_variance", (torch.rand(B, T), torch.ones(B), torch.ones(B, 1)), ValueError, ["mask"]),
    ],
)
def test_weighting_functions_reject(module, name, args, error, words):
    with pytest.raises(error) as info:
        getattr(module, name)(*args)
    check_message(info, words)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("where", ["hidden", "values"])
def test_check_finite_flags_nan(where, impl):
    args = hidden_args(**VALUES)
    args[where] = args[where].clone()
    args[where].view(-1)[3] = float("nan")
    with pytest.raises(ValueError) as info:
        wmtp_kernels.fused_weighted_mtp_loss(**args, check_finite=True, impl=impl)
    check_message(info, [where, "non-finite"])
