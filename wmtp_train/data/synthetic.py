"""Synthetic verifiable code tasks: which templates each split uses, and drawing a split's problems.

Problems (:mod:`wmtp_train.data.synthetic_problem`) are unique across the whole build by prompt text, and
held-out problems by ``(template, constants)`` too.

Splits (``SPLITS``):

- ``pretrain`` and ``train``: seen templates (every part alone, plus ``seen_pairs`` two-part and
  ``seen_triples`` three-part chains), constants from the training values, seen function names, frames
  and connectives;
- ``heldout_problems``: new problems of seen templates that have constants: a ``(template, constants)``
  no training problem has; in a fraction ``heldout_constant_rate`` of them one constant comes from the
  held-out values of its slot (values no training problem uses there, some above the training range);
- ``heldout_compositions``: ``unseen_pairs`` + ``unseen_triples`` chains, none of whose adjacent part
  pairs occurs in any seen template, with constants drawn like ``heldout_problems``'.

The two held-out splits differ only in whether the composition is new. In both, a fraction
``novel_surface_rate`` of problems also uses a function name, docstring frame and connective that no
training problem uses.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from wmtp_train.data.synthetic_parts import PARTS, PARTS_BY_NAME
from wmtp_train.data.synthetic_problem import (
    DIFFICULTY_BANDS,
    Problem,
    draw_constants,
    enumerate_chains,
    instantiate,
    template_name,
)

log = logging.getLogger(__name__)

SPLITS = ("pretrain", "train", "heldout_problems", "heldout_compositions")
HELDOUT_SPLITS = SPLITS[2:]


@dataclass(frozen=True)
class Catalogue:
    """Which templates each split draws from.

    Attributes:
        seen: templates of ``pretrain``, ``train`` and ``heldout_problems`` (all single parts included).
        unseen: templates of ``heldout_compositions`` only.
    """

    seen: tuple[tuple[str, ...], ...]
    unseen: tuple[tuple[str, ...], ...]


def _viable(chain: tuple[str, ...], rng: random.Random, seed: int, heldout: bool, tries: int = 12) -> bool:
    parts = [PARTS_BY_NAME[name] for name in chain]
    return any(instantiate(chain, rng, draw_constants(parts, rng, seed, heldout)) for _ in range(tries))


def build_catalogue(
    seed: int, seen_pairs: int, seen_triples: int, unseen_pairs: int, unseen_triples: int
) -> Catalogue:
    """Choose the seen and unseen templates (module docstring); unseen ones share no adjacent pair with seen.

    Templates are picked from a shuffled list of all type-valid chains: each time the first viable one
    that contains the part used least so far, so every part appears in several compositions.

    Args:
        seed: the build seed.
        seen_pairs: how many two-part templates training uses.
        seen_triples: how many three-part templates training uses.
        unseen_pairs: how many two-part templates the ``heldout_compositions`` split uses.
        unseen_triples: how many three-part templates the ``heldout_compositions`` split uses.

    Returns:
        The catalogue; all single parts are seen templates.
    """
    rng = random.Random(f"wmtp-synthetic-catalogue:{seed}")
    pools = {depth: enumerate_chains(depth) for depth in (2, 3)}
    for depth in (2, 3):
        rng.shuffle(pools[depth])

    def take(depth: int, n: int, reserved: set, heldout: bool) -> list[tuple[str, ...]]:
        containing: dict[str, list[tuple[str, ...]]] = {part.name: [] for part in PARTS}
        for chain in pools[depth]:
            if not set(itertools.pairwise(chain)) & reserved:
                for name in dict.fromkeys(chain):
                    containing[name].append(chain)
        uses: Counter = Counter()
        tried: set = set()
        chosen: list[tuple[str, ...]] = []
        while len(chosen) < n:
            open_parts = [name for name, chains in containing.items() if chains]
            if not open_parts:
                raise ValueError(f"only {len(chosen)} viable {depth}-part templates, {n} requested")
            rarest = min(open_parts, key=lambda name: uses[name])
            chain = containing[rarest].pop(0)
            if chain not in tried:
                tried.add(chain)
                if _viable(chain, rng, seed, heldout):
                    chosen.append(chain)
                    uses.update(chain)
        return chosen

    unseen = take(2, unseen_pairs, set(), True)
    unseen += take(3, unseen_triples, set(unseen), True)
    reserved = {pair for chain in unseen for pair in itertools.pairwise(chain)}
    seen = [(part.name,) for part in PARTS]
    seen += take(2, seen_pairs, reserved, False) + take(3, seen_triples, reserved, False)
    return Catalogue(seen=tuple(seen), unseen=tuple(unseen))


def generate_split(
    split: str,
    n: int,
    templates: Sequence[tuple[str, ...]],
    seed: int,
    depth_weights: Sequence[float],
    novel_surface_rate: float,
    heldout_constant_rate: float,
    taken: set,
    fits: Callable[[Problem], bool] = lambda problem: True,
    tries_per_template: int = 50,
) -> list[Problem]:
    """``n`` problems of one split, cycling through its templates so that each gets a fair share.

    Prompts are unique against ``taken``; a held-out problem's ``(template, constants)`` too, and is
    added to ``taken``, so training splits (generated after the held-out ones) cannot reuse it.

    Args:
        split: one of :data:`SPLITS` (held-out splits may draw held-out constants and novel surfaces).
        n: how many problems.
        templates: the templates to draw from: a depth is drawn by ``depth_weights``, then the next
            template of that depth in a shuffled rotation.
        seed: the build seed.
        depth_weights: relative weight of depths 1, 2, 3 (depths with no template are skipped).
        novel_surface_rate: fraction of held-out problems with a reserved function name, frame and connective.
        heldout_constant_rate: fraction of held-out problems with a held-out constant.
        taken: prompts and held-out keys already used (updated).
        fits: extra acceptance test (e.g. the token budget).
        tries_per_template: failed draws after which a template leaves the rotation.

    Returns:
        The problems with ``split`` set and ``task_id`` empty.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    heldout = split in HELDOUT_SPLITS
    rng = random.Random(f"wmtp-synthetic:{seed}:{split}")
    if split == "heldout_problems":  # a seen template without constants has no new problem
        templates = [t for t in templates if any(PARTS_BY_NAME[name].slots for name in t)]
    rotation = {d: [t for t in templates if len(t) == d] for d in DIFFICULTY_BANDS}
    for chains in rotation.values():
        rng.shuffle(chains)
    problems: list[Problem] = []
    while len(problems) < n:
        depths = [d for d in DIFFICULTY_BANDS if rotation[d] and depth_weights[d - 1] > 0]
        if not depths:
            raise ValueError(f"split {split}: only {len(problems)} of {n} problems could be drawn")
        chains = rotation[rng.choices(depths, [depth_weights[d - 1] for d in depths])[0]]
        chain = chains.pop(0)
        parts = [PARTS_BY_NAME[name] for name in chain]
        for _ in range(tries_per_template):
            novel = heldout and rng.random() < novel_surface_rate
            novel_constant = heldout and rng.random() < heldout_constant_rate and any(p.slots for p in parts)
            problem = instantiate(chain, rng, draw_constants(parts, rng, seed, novel_constant), novel)
            if problem is None or not fits(problem):
                continue
            key = (problem.template, problem.constants)
            if problem.prompt in taken or key in taken:
                continue
            taken.add(problem.prompt)
            if heldout:
                taken.add(key)
            problems.append(dataclasses.replace(problem, split=split, novel_constant=novel_constant))
            chains.append(chain)
            break
        else:
            log.info(
                "split %s: template %s left the rotation (no new problem in %d draws)",
                split,
                template_name(chain),
                tries_per_template,
            )
    return problems
