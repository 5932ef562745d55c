"""The run's models: their arguments, their initial weights, built sharded on the training device, and the
final consolidated export."""

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
    build_model,
    checkpoint_args,
    export_meta_checkpoint,
    load_meta_checkpoint,
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
        overrides = {"max_seq_len": cfg.max_seq_len} if cfg.max_seq_len else {}
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

    def initial_state(self, checkpoint_dir: str) -> dict[str, torch.Tensor]:
        """Full (unsharded) initial weights: a Meta checkpoint, or a fresh init seeded by ``run.seed``.

        Initialising a full model (rather than sharded DTensors) makes the initial weights independent
        of the world size, so 1-rank and N-rank runs start identical. The seed also covers the fresh
        value head of a Meta checkpoint: every rank must take its shard of the same initialisation.

        Args:
            checkpoint_dir: a consolidated checkpoint directory, or ``""`` for a fresh model.

        Returns:
            The state dict.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.run.seed)
            if checkpoint_dir:
                model, _ = load_meta_checkpoint(
                    checkpoint_dir, device="cpu", max_seq_len=self.args.max_seq_len
                )
                return model.state_dict()
            return build_model(self.args, device="cpu").state_dict()

    def allocate(self, mesh: DeviceMesh | None = None) -> MTPTransformer:
        """The model parallelised as ``[parallel]`` says and allocated on the training device, its weights
        not yet set (collective).

        Args:
            mesh: the data-parallel mesh (see :func:`~wmtp_train.train.parallelize.parallelize_model`).

        Returns:
            The model.
        """
        model = build_model(self.args, device="meta")
        model = parallelize_model(model, self.config.parallel, self.info.device, mesh)
        model.to_empty(device=self.info.device)
        return model

    def build(self, checkpoint_dir: str) -> MTPTransformer:
        """The model on the training device, parallelised as ``[parallel]`` says (collective).

        Args:
            checkpoint_dir: where the initial weights come from (see :meth:`initial_state`).

        Returns:
            The model (train mode, every parameter requiring grad).
        """
        model = self.allocate()
        full = self.initial_state(checkpoint_dir)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=True))
        return model

    def export(self, model: MTPTransformer, directory: Path) -> Path | None:
        """Gather the full model and write the consolidated Meta-format export (collective; rank 0 writes).

        Args:
            model: the (possibly sharded) model.
            directory: the export directory.

        Returns:
            The directory on rank 0, None elsewhere.
        """
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        path = None
        if self.info.is_main:
            plain = build_model(self.args, device="meta")
            plain.load_state_dict({k: v.float() for k, v in full.items()}, assign=True)
            path = export_meta_checkpoint(plain, directory)
        dist.barrier()
        return path
