"""``docs/DESIGN.md`` stays true: its worked examples match the reference, its cited sections exist."""

import math
import re
from pathlib import Path

import pytest
import torch

from wmtp_kernels import reference

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "DESIGN.md"
CITED_SECTIONS = (
    "TD errors",
    "Weights",
    "H-offset alignment",
    "Normalisation and masking",
    "Value loss and explained variance",
    "Kernel design",
    "Trainer stages",
    "Data",
)
# A citation: the section sign, a space and a capitalised section name in double quotes, as in
# docs/DESIGN.md "§ TD errors".
CITATION = re.compile(r'"§\s+([A-Z][^"]{0,60})"')


def _sections() -> dict[str, str]:
    parts = re.split(r"^## (.+)$", DESIGN.read_text(), flags=re.MULTILINE)
    # Whitespace is normalised so that line wrapping of the text does not matter.
    return {name.strip(): " ".join(body.split()) for name, body in zip(parts[1::2], parts[2::2])}


def _td(values, mask, terminal: str, gamma: float) -> list[float]:
    v = torch.tensor([values], dtype=torch.float64)
    m = None if mask is None else torch.tensor([mask])
    rewards = torch.tensor([1.0], dtype=torch.float64)
    return reference.compute_td_errors(v, rewards, m, gamma, terminal)[0].tolist()


def test_every_cited_section_exists():
    assert set(CITED_SECTIONS) <= set(_sections())


def test_every_citation_in_the_repository_names_a_section():
    sections = set(_sections())
    files = [ROOT / "README.md", ROOT / "pyproject.toml"] + [
        path
        for folder in ("wmtp_kernels", "wmtp_train", "tests", "benchmarks", "docs")
        for ext in ("py", "md", "toml")
        for path in (ROOT / folder).rglob(f"*.{ext}")
    ]
    dangling = [
        f"{path.relative_to(ROOT)}: {name!r}"
        for path in files
        for name in (" ".join(found.split()) for found in CITATION.findall(path.read_text(errors="replace")))
        if name not in sections
    ]
    assert not dangling, "citations of docs/DESIGN.md sections that do not exist:\n" + "\n".join(dangling)


@pytest.mark.parametrize(
    ("values", "mask", "terminal", "gamma", "shown"),
    [
        ([0.5, 0.7, 0.9], None, "last_state", 1.0, "[0.2, 0.2, 0.1]"),
        ([0.5, 0.7, 0.9], None, "last_transition", 1.0, "[0.2, 0.3, 0.0]"),
        ([0.5, 0.7, 0.9, 0.3], [1, 1, 1, 0], "last_state", 1.0, "[0.2, 0.2, 0.1, 0]"),
        ([0.5, 0.7, 0.9, 0.3], [1, 1, 1, 0], "last_transition", 1.0, "[0.2, 0.3, 0, 0]"),
        ([0.3, 0.5, 0.7, 0.9], [0, 1, 1, 1], "last_state", 1.0, "[0, 0.2, 0.2, 0.1]"),
        ([0.3, 0.5, 0.7, 0.9], [0, 1, 1, 1], "last_transition", 1.0, "[0, 0.2, 0.3, 0]"),
        ([0.5, 0.7, 0.9], None, "last_state", 0.9, "[0.13, 0.11, 0.1]"),
    ],
)
def test_td_examples_match_the_reference(values, mask, terminal, gamma, shown):
    assert shown in _sections()["TD errors"]
    expected = [float(x) for x in shown.strip("[]").split(", ")]
    assert _td(values, mask, terminal, gamma) == pytest.approx(expected, abs=1e-12)


def test_weight_example_and_statistics_match_the_reference():
    text = _sections()["Weights"]
    td = torch.tensor([0.2, -0.5, 0.1], dtype=torch.float64)
    weights = reference.build_weights(td)
    assert "w = [" + ", ".join(f"{w:.4f}" for w in weights.tolist()) + "]" in text
    stats = reference.compute_weight_stats(weights) | reference.compute_td_stats(td)
    for key in ("weight_mean", "weight_std", "weight_entropy", "td_mean", "td_std"):
        assert f"`{key} {stats[key]:.4f}`" in text, key
    assert f"{0.9 * math.log(5):.4f}" in text and f"{0.9 * math.log(0.1):.4f}" in text


def test_empty_heads_example_matches_the_reference():
    assert (
        "`T = 2`, `H = 4` gives `loss = ce(head 1 at t = 0) / 4`" in _sections()["Normalisation and masking"]
    )
    logits = torch.randn(1, 2, 4, 7, dtype=torch.float64)
    labels = torch.tensor([[1, 2]])
    head1 = torch.nn.functional.cross_entropy(logits[0, 0, 0][None], labels[0, 1:])
    assert reference.weighted_mtp_cross_entropy(logits, labels).item() == pytest.approx(head1.item() / 4)


def test_last_state_reward_never_reaches_the_loss():
    """The doc's claim: under last_state the gradient of the loss with respect to R is 0."""
    logits = torch.randn(1, 3, 2, 5, dtype=torch.float64)
    values = torch.tensor([[0.5, 0.7, 0.9]], dtype=torch.float64)
    grads = {}
    for terminal in ("last_state", "last_transition"):
        rewards = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
        reference.weighted_mtp_cross_entropy(
            logits, torch.tensor([[1, 2, 3]]), values=values, rewards=rewards, terminal=terminal
        ).backward()
        grads[terminal] = rewards.grad.item()
    assert grads["last_state"] == 0.0
    assert grads["last_transition"] != 0.0
