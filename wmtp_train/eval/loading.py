"""Load a trained checkpoint for evaluation: a consolidated directory, or a run directory with ``export/``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from wmtp_train.config import RUN_CONFIG_FILE, TrainConfig
from wmtp_train.config_files import load_config_file
from wmtp_train.data.tokenizer import load_tokenizer
from wmtp_train.model import MTPTransformer, load_meta_checkpoint
from wmtp_train.model.meta_checkpoint import PARAMS_FILE

EXPORT_SUBDIR = "export"


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The consolidated checkpoint directory of ``path`` (itself, or ``path/export`` for a run dir).

    Args:
        path: a consolidated directory or a training run directory.

    Returns:
        The directory holding ``params.json``.
    """
    path = Path(path)
    for candidate in (path, path / EXPORT_SUBDIR):
        if (candidate / PARAMS_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"checkpoint: no {PARAMS_FILE} in {path} or {path / EXPORT_SUBDIR} (pass an exported Meta "
        "consolidated directory or a run directory with export/)"
    )


def load_for_evaluation(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[MTPTransformer, Any, Path]:
    """Load a checkpoint for inference.

    Args:
        path: see :func:`resolve_checkpoint`.
        device: where the model goes.
        dtype: parameter dtype (default: the checkpoint's).

    Returns:
        ``(model in eval mode without grads, tokenizer, resolved directory)``.
    """
    directory = resolve_checkpoint(path)
    model, _ = load_meta_checkpoint(directory, device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(
            f"tokenizer vocab {tokenizer.vocab_size} exceeds the model's vocab_size {model.args.vocab_size}"
        )
    return model, tokenizer, directory


def run_config(checkpoint: str | os.PathLike) -> TrainConfig | None:
    """The resolved configuration the trainer saved for the run that wrote ``checkpoint``.

    Args:
        checkpoint: a run directory, or the ``export/`` directory inside one.

    Returns:
        The run's ``config.toml``, or None when ``checkpoint`` is not (in) a run directory.
    """
    path = Path(checkpoint)
    for run_dir in (path, path.parent) if path.name == EXPORT_SUBDIR else (path,):
        if (run_dir / RUN_CONFIG_FILE).is_file():
            return load_config_file(run_dir / RUN_CONFIG_FILE)
    return None
