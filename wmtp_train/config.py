"""Typed trainer configuration: one dataclass per recipe section, each validating its ranges and choices
in ``__post_init__``. :mod:`wmtp_train.config_files` loads them from a recipe TOML and ``--set`` overrides;
the shipped recipes live in ``wmtp_train/recipes/*.toml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wmtp_kernels import WeightingOptions
from wmtp_train.model.lora import LoRAOptions

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
RUN_CONFIG_FILE = "config.toml"
"""Where a run saves its resolved configuration, in its ``run.out_dir``."""
RECIPES = tuple(sorted(path.stem for path in RECIPE_DIR.glob("*.toml")))
"""The shipped recipes: one TOML file each in ``wmtp_train/recipes/``."""
VALUE_LOSSES = ("mse", "huber")
MIXED_PRECISION_SETTINGS = ("auto", "bf16", "none")
STAGE1_SAMPLERS = ("balanced", "uniform")
RHO1_SCORES = ("mean_heads", "next_token")
ACTIVATION_CHECKPOINT_MODES = ("none", "full", "selective")


def _choice(section: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{section}.{name} must be one of {choices}, got {value!r}")


def _positive(section: str, obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{section}.{name} must be {bound}, got {value!r}")


@dataclass
class RunConfig:
    """Where, how long, how reproducibly."""

    out_dir: str = "runs/default"
    """Run directory: checkpoints, export, metrics.jsonl, the MLflow store and config.toml."""
    seed: int = 0
    """Base seed; rank r seeds torch/numpy/python with ``seed + r`` (data order uses ``seed`` alone)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (stage 1 + stage 2); 0 = run every stage to the end.
    A stopping point only: LR schedules and the curriculum keep their configured lengths, so a stopped
    run resumes exactly where an uninterrupted one would be."""
    log_every: int = 1
    """Console progress line every N steps (metrics are recorded every step)."""
    threads: int = 0
    """torch intra-op threads per rank on CPU; 0 = cores // local world size."""

    def __post_init__(self) -> None:
        _choice("run", "device", self.device, ("auto", "cpu", "cuda"))
        _positive("run", self, "max_steps", "threads", allow_zero=True)
        _positive("run", self, "log_every")


@dataclass
class ModelConfig:
    """Which model, from where."""

    preset: str = "micro"
    """A key of ``wmtp_train.model.PRESETS``; ignored when ``checkpoint_dir`` is set."""
    checkpoint_dir: str = ""
    """Start from a Meta consolidated checkpoint directory (``params.json`` + ``consolidated.pth``)."""
    max_seq_len: int = 0
    """Override of the preset's maximum sequence length (0 = keep)."""
    value_head: str = ""
    """Override of the value head kind (``mlp``, ``linear`` or ``hazard``; empty = the checkpoint's or the
    preset's). A checkpoint whose saved value head is of another kind gets a fresh one."""

    def __post_init__(self) -> None:
        from wmtp_train.model.args import PRESETS, VALUE_HEAD_KINDS

        if not self.checkpoint_dir:
            _choice("model", "preset", self.preset, tuple(PRESETS))
        _positive("model", self, "max_seq_len", allow_zero=True)
        if self.value_head:
            _choice("model", "value_head", self.value_head, VALUE_HEAD_KINDS)

    def arg_overrides(self) -> dict[str, object]:
        """The :class:`~wmtp_train.model.ModelArgs` fields this section overrides."""
        overrides: dict[str, object] = {"max_seq_len": self.max_seq_len} if self.max_seq_len else {}
        return overrides | ({"value_head": self.value_head} if self.value_head else {})


@dataclass
class DataConfig:
    """Training data."""

    path: str = ""
    """JSONL file of records; empty = the HumanEval-verified default set (built and cached on first use)."""
    heldout_path: str = ""
    """JSONL file for held-out evaluation; empty = the default set's held-out split when ``path`` is empty,
    else none."""
    max_len: int = 512
    """Maximum tokens per sample (truncation policy in ``wmtp_train.data.dataset``)."""
    padding_side: str = "right"
    """``right`` or ``left``."""
    on_error: str = "raise"
    """Invalid JSONL lines: ``raise`` (error with file:line) or ``skip`` (counted and logged)."""
    eval_batches: int = 8
    """Batches (per rank) used to measure explained variance on train and held-out data at stage ends."""

    def __post_init__(self) -> None:
        _choice("data", "padding_side", self.padding_side, ("right", "left"))
        _choice("data", "on_error", self.on_error, ("raise", "skip"))
        if self.max_len < 4:
            raise ValueError(f"data.max_len must be >= 4, got {self.max_len}")
        _positive("data", self, "eval_batches", allow_zero=True)


@dataclass
class ParallelConfig:
    """Stage 0: process group, FSDP2, activation checkpointing and per-block compilation."""

    fsdp: bool = True
    """Shard with FSDP2 ``fully_shard`` (per block, then head + value head, then root)."""
    mixed_precision: str = "auto"
    """``auto``: bf16 parameters with fp32 gradient reduction on CUDA, full fp32 on CPU; ``bf16``; ``none``.
    """
    activation_checkpoint: str = "none"
    """Recompute transformer blocks in backward instead of keeping their activations (non-reentrant, per
    block): ``none``; ``full`` (every block); ``selective`` (every other block, about half the saving
    for half the recomputation). The output head and its fused loss are never recomputed."""
    compile: bool = False
    """``torch.compile`` each transformer block's forward (fullgraph; the first steps pay the compilation)."""

    def __post_init__(self) -> None:
        _choice("parallel", "mixed_precision", self.mixed_precision, MIXED_PRECISION_SETTINGS)
        _choice("parallel", "activation_checkpoint", self.activation_checkpoint, ACTIVATION_CHECKPOINT_MODES)


@dataclass
class Stage1Config:
    """Critic pre-training on ``trunk_forward`` (value head regression onto the reward)."""

    enabled: bool = False
    """Run stage 1 before stage 2."""
    steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Samples per rank per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.1
    """Cosine decays to ``lr * min_lr_ratio``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 = none)."""
    value_loss: str = "mse"
    """``mse`` or ``huber``."""
    huber_delta: float = 1.0
    """Huber transition point."""
    unfreeze_trunk: bool = False
    """Also train the embedding and trunk blocks (default: only the value head moves)."""
    sampler: str = "balanced"
    """``balanced`` (50/50 correct / incorrect, spread over difficulties) or ``uniform`` (the records as
    they are, so V estimates the data's own success rate)."""
    cache_trunk_states: bool = False
    """Run the frozen trunk once over every training record before the first step and keep its states at
    the completion tokens on the training device, so that each step runs only the value head: many more
    steps for the same time, at a memory cost of (completion tokens of the training set) x d x the
    trunk's dtype size (the micro preset on the synthetic task's 5,909 records: 200 MiB). Not with
    ``unfreeze_trunk``."""

    def __post_init__(self) -> None:
        if self.cache_trunk_states and self.unfreeze_trunk:
            raise ValueError(
                "stage1.cache_trunk_states needs a frozen trunk: it cannot be combined with "
                "stage1.unfreeze_trunk=true"
            )
        _positive("stage1", self, "steps", "micro_batch_size", "grad_accum", "lr", "huber_delta")
        _positive("stage1", self, "warmup_steps", "weight_decay", "max_grad_norm", allow_zero=True)
        _choice("stage1", "value_loss", self.value_loss, VALUE_LOSSES)
        _choice("stage1", "sampler", self.sampler, STAGE1_SAMPLERS)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"stage1.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class Stage2Config:
    """Weighted MTP training."""

    steps: int = 200
    """Optimizer steps."""
    micro_batch_size: int = 4
    """Samples per rank per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.1
    """Cosine decays to ``lr * min_lr_ratio``."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; norms, biases and embeddings are not decayed)."""
    max_grad_norm: float = 0.5
    """Gradient clipping (0 = none)."""
    weighting: str = "uniform"
    """Token-weighting recipe (``wmtp_train.train.weighting``): ``uniform``, ``correct_only`` (uniform on
    the correct records only), ``td`` (critic TD errors, in-kernel) or ``rho1`` (excess loss)."""
    value_coef: float = 0.5
    """Weight of the clipped value loss in the total loss (0 = the critic is not trained in stage 2)."""
    clip_range: float = 0.2
    """PPO-style value clipping around V_old (0 = no clipping)."""
    value_loss: str = "mse"
    """``mse`` or ``huber``."""
    huber_delta: float = 1.0
    """Huber transition point."""
    value_snapshot_every: int = 10
    """V_old is a frozen copy of the value head refreshed every N optimizer steps."""
    loss_impl: str = "fused"
    """``fused`` (``wmtp_kernels.fused_weighted_mtp_loss``) or ``reference`` (plain PyTorch)."""
    length_window: int = 0
    """Length grouping: each window of N steps' samples sorted by length into batches, batch order
    shuffled (``CurriculumSampler``; less padding); 0 = off."""

    def __post_init__(self) -> None:
        _positive("stage2", self, "steps", "micro_batch_size", "grad_accum", "lr", "huber_delta")
        _positive("stage2", self, "value_snapshot_every")
        _positive(
            "stage2",
            self,
            "warmup_steps",
            "weight_decay",
            "max_grad_norm",
            "value_coef",
            "clip_range",
            "length_window",
            allow_zero=True,
        )
        from wmtp_train.model.mtp import LOSS_IMPLEMENTATIONS
        from wmtp_train.train.weighting import WEIGHTINGS

        _choice("stage2", "weighting", self.weighting, tuple(WEIGHTINGS))
        _choice("stage2", "value_loss", self.value_loss, VALUE_LOSSES)
        _choice("stage2", "loss_impl", self.loss_impl, LOSS_IMPLEMENTATIONS)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"stage2.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class Rho1Config:
    """Rho-1 token selection by excess loss against a frozen reference model."""

    reference_checkpoint: str = ""
    """Meta checkpoint directory of the reference model; empty = the run's initial weights."""
    top_k: float = 0.6
    """Fraction of the micro-batch's trained tokens selected (highest excess loss)."""
    score: str = "mean_heads"
    """Per-token score of token j+1: ``mean_heads`` (mean excess CE over the heads predicting it) or
    ``next_token`` (head 1 only)."""
    unselected_weight: float = 0.0
    """Weight of the tokens not selected: 0 = Rho-1's hard selection (weights 1/0); a value in (0, 1) is
    the soft variant (unselected tokens still contribute, down-weighted)."""

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= 1:
            raise ValueError(f"rho1.top_k must be in (0, 1], got {self.top_k}")
        _choice("rho1", "score", self.score, RHO1_SCORES)
        if not 0 <= self.unselected_weight <= 1:
            raise ValueError(f"rho1.unselected_weight must be in [0, 1], got {self.unselected_weight}")


@dataclass
class CheckpointConfig:
    """Stage 3: sharded checkpoints (torch.distributed.checkpoint) and the final export."""

    every: int = 100
    """Save every N optimizer steps (and always at the end; 0 = only at the end)."""
    keep: int = 2
    """Keep the last K complete checkpoints."""
    export: bool = True
    """Write a consolidated Meta-format export to ``<out>/export`` at the end."""

    def __post_init__(self) -> None:
        _positive("checkpoint", self, "every", allow_zero=True)
        _positive("checkpoint", self, "keep")


@dataclass
class TrackingConfig:
    """MLflow (rank 0 only) and the local metrics file."""

    enabled: bool = True
    """Log to MLflow (metrics.jsonl under the run directory is always written)."""
    tracking_uri: str = ""
    """Empty = ``MLFLOW_TRACKING_URI`` if set, else the embedded store ``sqlite:///<out>/mlflow.db``."""
    experiment: str = "wmtp"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name (empty = the recipe name)."""
    log_artifacts: bool = True
    """Upload the final export (or checkpoint) as a run artifact."""


@dataclass
class NumericsConfig:
    """Non-finite losses and gradients."""

    max_consecutive_skips: int = 5
    """A non-finite loss or gradient norm skips the step; abort after this many in a row."""
    check_finite: bool = False
    """Debug mode (``--debug``): the loss checks the head hidden states and the values for NaN / Inf and
    raises naming the tensor, instead of the step being skipped later for a non-finite loss."""
    inject_nan_steps: str = ""
    """Debug: comma-separated global steps whose loss is replaced by NaN (tests the skip path)."""

    def __post_init__(self) -> None:
        _positive("numerics", self, "max_consecutive_skips")
        self.nan_steps()

    def nan_steps(self) -> frozenset[int]:
        """The parsed ``inject_nan_steps``."""
        try:
            return frozenset(int(s) for s in self.inject_nan_steps.split(",") if s.strip())
        except ValueError:
            raise ValueError(
                f"numerics.inject_nan_steps must be comma-separated ints, got {self.inject_nan_steps!r}"
            ) from None


@dataclass
class TrainConfig:
    """The whole resolved configuration of a run."""

    recipe: str = "baseline"
    """Recipe name (informational; set from the recipe file)."""
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    td: WeightingOptions = field(default_factory=WeightingOptions)
    """TD-error token weights, ``w = clamp(exp(td / beta), min_weight, max_weight)`` (the ``[td]`` table:
    gamma, beta, min_weight, max_weight, terminal; docs/DESIGN.md, "TD errors" and "Weights")."""
    rho1: Rho1Config = field(default_factory=Rho1Config)
    lora: LoRAOptions = field(default_factory=LoRAOptions)
    """Low-rank adapters instead of full fine-tuning (the ``[lora]`` table: enabled, rank, alpha, dropout,
    trunk_targets, head_targets, train_output_head; ``wmtp_train.model.lora``)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.td.gamma <= 1:
            raise ValueError(f"td.gamma must be in [0, 1], got {self.td.gamma}")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (TOML-serialisable)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for MLflow params."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out

    def to_toml(self) -> str:
        """The resolved config as TOML text (loadable by :func:`wmtp_train.config_files.load_config_file`)."""
        lines = [f"recipe = {_toml_value(self.recipe)}"]
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                lines.append(f"\n[{key}]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
