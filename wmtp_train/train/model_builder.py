"""The run's models: their arguments, their initial weights (with LoRA adapters when ``[lora]`` is on), built
sharded on the training device, and the final consolidated export (merged, plus the adapters file)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh

from wmtp_train.config import TrainConfig
from wmtp_train.model import (
    ModelArgs,
    MTPTransformer,
    apply_lora,
    build_model,
    checkpoint_args,
    export_lora_adapters,
    export_meta_checkpoint,
    load_meta_checkpoint,
    merge_lora_state,
    resolve_args,
)
from wmtp_train.train.parallelize import DistInfo, parallelize_model


class ModelBuilder:
    """Builds the run's models identically on every rank (collective where it says so).

    Args:
        config: the run's configuration (``model``, ``data.max_len``, ``parallel``, ``run.seed``).
        info: this process's place in the job.
        vocab_size: the tokenizer's vocabulary, which the model's must hold.
    """

    def __init__(self, config: TrainConfig, info: DistInfo, vocab_size: int):
        self.config = config
        self.info = info
        self.args = self._resolve_args(vocab_size)

    def _resolve_args(self, vocab_size: int) -> ModelArgs:
        cfg = self.config.model
        overrides = cfg.arg_overrides()
        if cfg.checkpoint_dir:
            args = checkpoint_args(cfg.checkpoint_dir, **overrides)
        else:
            args = dataclasses.replace(resolve_args(cfg.preset), **overrides)
        if self.config.data.max_len > args.max_seq_len:
            raise ValueError(
                f"data.max_len ({self.config.data.max_len}) exceeds the model's "
                f"max_seq_len ({args.max_seq_len})"
            )
        if vocab_size > args.vocab_size:
            raise ValueError(
                f"tokenizer vocab ({vocab_size}) exceeds the model's vocab_size ({args.vocab_size})"
            )
        return args

    def initial_state(self, checkpoint_dir: str, adapted: bool = False) -> dict[str, torch.Tensor]:
        """Full (unsharded) initial weights: a Meta checkpoint, or a fresh init seeded by ``run.seed``.

        Initialising a full model (rather than sharded DTensors) makes the initial weights independent
        of the world size, so 1-rank and N-rank runs start identical. The seed also covers the fresh
        value head of a Meta checkpoint and the LoRA adapters: every rank must take its shard of the same
        initialisation. This is also how a LoRA run gets its frozen base back on resume.

        Args:
            checkpoint_dir: a consolidated checkpoint directory, or ``""`` for a fresh model.
            adapted: add the ``[lora]`` adapters (initialised after the base, from the same seed).

        Returns:
            The state dict.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.run.seed)
            if checkpoint_dir:
                model, _ = load_meta_checkpoint(
                    checkpoint_dir,
                    device="cpu",
                    max_seq_len=self.args.max_seq_len,
                    value_head=self.args.value_head,
                )
            else:
                model = build_model(self.args, device="cpu")
            if adapted:
                apply_lora(model, self.config.lora)
            return model.state_dict()

    def allocate(self, mesh: DeviceMesh | None = None, adapted: bool = True) -> MTPTransformer:
        """The model parallelised as ``[parallel]`` says and allocated on the training device, its weights
        not yet set (collective).

        Args:
            mesh: the data-parallel mesh (see :func:`~wmtp_train.train.parallelize.parallelize_model`).
            adapted: add LoRA adapters when ``lora.enabled`` (False for a frozen reference model).

        Returns:
            The model.
        """
        model = build_model(self.args, device="meta")
        if adapted and self.config.lora.enabled:
            apply_lora(model, self.config.lora)
        model = parallelize_model(model, self.config.parallel, self.info.device, mesh)
        model.to_empty(device=self.info.device)
        return model

    def build(self, checkpoint_dir: str, adapted: bool = True) -> MTPTransformer:
        """The model on the training device, parallelised as ``[parallel]`` says (collective).

        Args:
            checkpoint_dir: where the initial weights come from (see :meth:`initial_state`).
            adapted: add LoRA adapters when ``lora.enabled`` (False for a frozen reference model).

        Returns:
            The model (train mode, every parameter requiring grad).
        """
        adapted = adapted and self.config.lora.enabled
        model = self.allocate(adapted=adapted)
        full = self.initial_state(checkpoint_dir, adapted)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=True))
        return model

    def base_source(self) -> dict[str, str | int]:
        """Where the run's initial weights come from: ``model.checkpoint_dir``, else ``model.preset`` and
        ``run.seed`` (recorded with LoRA adapters, whose frozen base is not saved with them)."""
        cfg = self.config
        if cfg.model.checkpoint_dir:
            return {"checkpoint_dir": cfg.model.checkpoint_dir, "seed": cfg.run.seed}
        return {"preset": cfg.model.preset, "seed": cfg.run.seed}

    def export(self, model: MTPTransformer, directory: Path) -> Path | None:
        """Gather the full model and write the consolidated Meta-format export (collective; rank 0 writes).

        With LoRA the adapters are merged into the exported weights (``W + alpha / r * B A``), and the
        adapters alone are written beside them (:data:`~wmtp_train.model.lora.ADAPTERS_FILE`).

        Args:
            model: the (possibly sharded) model.
            directory: the export directory.

        Returns:
            The directory on rank 0, None elsewhere.
        """
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        path = None
        if self.info.is_main:
            lora = self.config.lora
            if lora.enabled:
                export_lora_adapters(full, lora, self.base_source(), directory)
                full = merge_lora_state(full, lora.scaling)
            plain = build_model(self.args, device="meta")
            plain.load_state_dict({k: v.float() for k, v in full.items()}, assign=True)
            path = export_meta_checkpoint(plain, directory)
        dist.barrier()
        return path
