"""The run's inputs: the tokenizer, the training and held-out datasets, and micro-batches on the device."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from wmtp_kernels import IGNORE_INDEX
from wmtp_train.config import TrainConfig
from wmtp_train.data.dataset import LazyJsonlDataset, collate
from wmtp_train.data.tokenizer import load_tokenizer
from wmtp_train.train.parallelize import DistInfo


class TrainingData:
    """The tokenizer and datasets of a run (collective: rank 0 builds the default data first).

    Args:
        config: the run's configuration (``data``, and ``model.checkpoint_dir`` for the tokenizer).
        info: this process's place in the job.
    """

    def __init__(self, config: TrainConfig, info: DistInfo):
        self.config = config.data
        self.device = info.device
        self.tokenizer = load_tokenizer(config.model.checkpoint_dir or None)
        train_path, heldout_path = self.config.path, self.config.heldout_path
        if not train_path:
            from wmtp_train.data import ensure_default_dataset

            if info.is_main:
                ensure_default_dataset()
            dist.barrier()
            default = ensure_default_dataset()  # cached now: every rank gets the paths
            train_path = str(default.train_path)
            heldout_path = heldout_path or str(default.heldout_path)
        self.train = self._open(train_path)
        self.heldout = self._open(heldout_path) if heldout_path else None

    def _open(self, path: str) -> LazyJsonlDataset:
        return LazyJsonlDataset(path, self.tokenizer, self.config.max_len, on_error=self.config.on_error)

    def batch(self, indices: Sequence[int], dataset: LazyJsonlDataset | None = None) -> dict[str, Any]:
        """Collate records into a micro-batch on the training device.

        Args:
            indices: record indices.
            dataset: where the records come from (default: the training set).

        Returns:
            :func:`~wmtp_train.data.dataset.collate`'s dict plus ``indices`` [B] (the record indices),
            tensors on the device.
        """
        dataset = self.train if dataset is None else dataset
        samples = [dataset[int(i)] for i in indices]
        batch = collate(samples, self.tokenizer.pad_id, self.config.padding_side, IGNORE_INDEX)
        batch["indices"] = torch.tensor([int(i) for i in indices], dtype=torch.int64)
        return {
            k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()
        }
