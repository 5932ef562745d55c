"""What the recipe comparison runs: budgets, optimiser settings and evaluation sizes, and how a token
budget becomes a number of optimizer steps for a recipe.

Budgets are in tokens (bos + prompt + completion + eos, what the trainer counts as ``tokens``), never in
steps: a recipe that samples other records (``correct_only`` draws only correct ones) gets the steps that
spend the same tokens. The steps come from the expected tokens per sample of the records the recipe's
stage-2 sampler draws (:class:`~wmtp_train.data.samplers.CurriculumSampler`: its bucket probabilities over
the stage, times each bucket's mean length); the tokens the runs really processed are reported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from wmtp_train.config import MIXED_PRECISION_SETTINGS, STAGE1_SAMPLERS
from wmtp_train.data.dataset import LazyJsonlDataset
from wmtp_train.data.samplers import CurriculumSampler
from wmtp_train.data.synthetic_build import SyntheticParams
from wmtp_train.model.args import VALUE_HEAD_KINDS
from wmtp_train.train.weighting import WEIGHTINGS

RECIPE_WEIGHTING = {
    "baseline": "uniform",
    "correct_only": "correct_only",
    "verifiable": "td",
    "rho1_weighted": "rho1",
}
"""The recipes the protocol compares and their stage-2 token weighting."""

DEFAULT_RECIPES = ("baseline", "correct_only", "verifiable")
"""The recipes compared when none are named: the question (``verifiable``) against uniform training and
filtered fine-tuning. ``rho1_weighted`` is opt-in (``--recipes``): its reference-model forward makes it the
slowest recipe, and the default protocol already takes 57 minutes here (README "Does the weighting
help?")."""


@dataclass(frozen=True)
class Protocol:
    """Budgets and settings of one comparison (every recipe gets the same stage-2 settings)."""

    preset: str = "micro"
    """Model preset of the base model (``wmtp_train.model.PRESETS``)."""
    problems: int = 6000
    """Problems of the data set built when no ``--data`` is given (``build-synthetic --problems``)."""
    split_fractions: tuple[float, ...] = (0.7, 0.2, 0.05, 0.05)
    """Its split fractions (pretrain, train, held-out problems, held-out compositions): most problems go to
    the unlabelled pre-training split, which is what teaches the base model to write these functions."""
    pretrain_tokens: int = 6_000_000
    """Plain-MTP tokens of the base model on the ``pretrain`` split. At micro-batch 16, 5 M tokens leave 4
    of 5 seeds' bases at the floor (greedy pass@1 under 0.08, in fp32 and in bf16 alike) and 6 M leave 1 or
    2 of 3, depending on small numerical differences; at micro-batch 8 none of 5 stayed there (README
    "Does the weighting help?")."""
    pretrain_lr: float = 3e-3
    """Peak learning rate of the base model."""
    finetune_tokens: int = 600_000
    """Stage-2 tokens of every recipe on the ``train`` split."""
    finetune_lr: float = 1e-3
    """Peak stage-2 learning rate of every recipe."""
    pretrain_micro_batch_size: int = 8
    """Sequences per optimizer step of the base model's pre-training (one process). At 8 (twice the steps
    of 16 for the same tokens, ~9 % slower per token) all five seeds' bases left the floor, where at 16
    one or two of three did (README "Does the weighting help?")."""
    micro_batch_size: int = 16
    """Sequences per optimizer step of every recipe's fine-tuning (one process)."""
    warmup_steps: int = 20
    """Linear warm-up steps of every run."""
    length_window: int = 16
    """``stage2.length_window`` of the base model and of every recipe: batches of records of similar
    length (less padding; README "Does the weighting help?" has what it saves)."""
    critic_steps: int = 3000
    """Stage-1 (critic) steps of ``verifiable``, on the frozen base trunk's cached states
    (``stage1.cache_trunk_states``; a cost reported apart)."""
    critic_lr: float = 2e-3
    """Stage-1 learning rate."""
    critic_micro_batch_size: int = 64
    """Records per stage-1 step."""
    critic_value_head: str = "hazard"
    """The critic's value head kind (``model.value_head``), which ``verifiable``'s stage 2 inherits."""
    critic_sampler: str = "uniform"
    """``stage1.sampler``: ``uniform`` keeps the records' own success rate, which V then estimates."""
    mixed_precision: str = "bf16"
    """``parallel.mixed_precision`` of every training run: bf16 parameters in forward and backward, fp32
    master weights and gradient reduction, attention in fp32 on the CPU; ``none`` for full fp32. On this
    CPU (AVX-512 BF16) a 6 M-token base trains in 24 min at micro-batch 8, and at 16 in 21 min against 26
    with bf16 attention (README "Does the weighting help?")."""
    greedy_problems: int | None = 150
    """Problems per held-out split for greedy pass@1 (the first ones in task order; None: all)."""
    sampled_problems: int = 32
    """Problems per held-out split for sampled pass@k (the first ones in task order)."""
    samples: int = 5
    """Samples per problem for sampled pass@k (``k`` up to this)."""
    temperature: float = 0.8
    """Sampling temperature of sampled pass@k (top-p 0.95)."""
    max_new_tokens: int = 192
    """Generation budget (the longest canonical completion is 147 byte tokens)."""
    critic_problems: int | None = 150
    """Held-out problems per split whose records the critic report scores (None: all)."""

    def data_params(self) -> SyntheticParams:
        """The ``build-synthetic`` parameters of the data set the protocol builds."""
        return SyntheticParams(problems=self.problems, split_fractions=self.split_fractions)

    def __post_init__(self) -> None:
        for name in (
            "pretrain_tokens",
            "finetune_tokens",
            "pretrain_micro_batch_size",
            "micro_batch_size",
            "critic_steps",
            "critic_micro_batch_size",
            "samples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"Protocol.{name} must be >= 1, got {getattr(self, name)}")
        for name, choices in (
            ("critic_value_head", VALUE_HEAD_KINDS),
            ("critic_sampler", STAGE1_SAMPLERS),
            ("mixed_precision", MIXED_PRECISION_SETTINGS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"Protocol.{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("greedy_problems", "critic_problems"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"Protocol.{name} must be >= 1 or None, got {getattr(self, name)}")


DEFAULT = Protocol()
"""The default comparison (README "Does the weighting help?" gives its measured time on this CPU)."""
QUICK = dataclasses.replace(
    DEFAULT,
    problems=2400,
    pretrain_tokens=300_000,
    finetune_tokens=80_000,
    critic_steps=300,
    greedy_problems=32,
    sampled_problems=8,
    critic_problems=32,
)
"""``--quick``: one seed, smaller budgets and evaluation sets (a smoke test of the whole protocol)."""


def check_recipes(recipes: list[str]) -> list[str]:
    """The recipes, validated against :data:`RECIPE_WEIGHTING` (order kept, duplicates dropped)."""
    unknown = [r for r in recipes if r not in RECIPE_WEIGHTING]
    if unknown or not recipes:
        raise ValueError(f"recipes must be a non-empty subset of {sorted(RECIPE_WEIGHTING)}, got {recipes}")
    return list(dict.fromkeys(recipes))


def expected_tokens_per_sample(dataset: LazyJsonlDataset, weighting: str) -> float:
    """Mean tokens of a stage-2 sample of ``dataset`` under ``weighting``'s record choice and the curriculum.

    Args:
        dataset: the training records (tokenised as the trainer does).
        weighting: a ``stage2.weighting`` name.

    Returns:
        The expectation over the stage (the curriculum's phases weighted by their length).
    """
    index = dataset.index
    records = WEIGHTINGS[weighting].records(index)
    pool = np.arange(len(index)) if records is None else np.asarray(records)
    lengths = np.array([len(dataset[int(i)].input_ids) for i in pool], dtype=np.float64)
    steps = 100
    sampler = CurriculumSampler(index.difficulty[pool], total_steps=steps, global_batch_size=1)
    bucket_means = np.array(
        [lengths[members].mean() if len(members) else 0.0 for members in sampler.buckets], dtype=np.float64
    )
    return float(np.mean([sampler.bucket_probabilities(step) @ bucket_means for step in range(steps)]))


def steps_for(tokens: int, micro_batch_size: int, tokens_per_sample: float) -> int:
    """Optimizer steps that spend ``tokens`` at ``micro_batch_size`` samples of that mean length (>= 1)."""
    return max(1, round(tokens / (micro_batch_size * tokens_per_sample)))
