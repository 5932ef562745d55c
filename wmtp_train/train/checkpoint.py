"""Stage 3: atomic, verified, sharded checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout under ``<out>/checkpoints``::

    step_00000120/          a complete checkpoint
        .metadata  __*_*.distcp   (DCP files, one set per rank)
        manifest.json       step, stage, and the size + CRC32 of every file (written last)
    step_00000140.tmp/      a save in progress (never considered for resume)
    step_00000120.old/      the previous copy of a step while a re-save replaces it

Atomicity: every rank writes into ``step_N.tmp/``; after a barrier rank 0 checksums the files, writes
``manifest.json`` (fsynced, via its own temp file) and renames the directory to ``step_N/``. Re-saving an
existing step (after resuming from an earlier checkpoint, say) first renames the old ``step_N/`` to
``step_N.old/``, then renames the new one into place, then deletes the old one, so some complete copy of
step N exists at every instant. A save killed at any point leaves either a ``.tmp`` directory (ignored,
removed by the next save), a ``.old`` directory (used for resume while ``step_N/`` is missing, put back
or removed by the next save), or a complete checkpoint. On resume, a checkpoint whose manifest is missing
or whose files differ in size or CRC32 from it is refused with a message, and the previous complete one
is used.

What the trainer saves (all ranks; :class:`Checkpointer`): ``app`` (model and optimizer, sharded through
``torch.distributed.checkpoint.state_dict`` so they reload under FSDP2), ``lr_scheduler``, ``sampler``,
``running_ev``, ``trainer`` (step, stage, counters), the stage's extras (the value-head snapshot V_old)
and ``rng.rank{r}`` (torch / numpy / python generator states of rank r, restored on the same rank). A LoRA
run saves only what it trains (adapters, value head, optionally the output head) and their optimizer
state, plus ``frozen_base``: a fingerprint of the frozen base it reloads from its source on resume.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from wmtp_train.train.parallelize import all_reduce

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_REPLACED_DIR = re.compile(r"^step_(\d+)\.old$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, incomplete or corrupted)."""


class ModelOptimizerState(Stateful):
    """Model + optimizer as one DCP ``Stateful`` (sharded state dicts, FSDP2-aware).

    Args:
        model: the (possibly FSDP2-sharded) model.
        optimizer: its optimizer, or None to save / load the model alone.
        saved: which model parameters are saved and restored (by state-dict key); None = all. A LoRA run
            passes ``LoRAOptions.is_trained``: the frozen base is reloaded from its source instead.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        saved: Callable[[str], bool] | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.saved = saved

    def state_dict(self) -> dict[str, Any]:
        """``{"model": ..., "optim": ...}`` sharded state dicts."""
        optimizers = [] if self.optimizer is None else [self.optimizer]
        model_sd, optim_sd = get_state_dict(self.model, optimizers)
        if self.saved is not None:
            model_sd = {key: value for key, value in model_sd.items() if self.saved(key)}
        return {"model": model_sd, "optim": optim_sd} if optimizers else {"model": model_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the dicts produced by :meth:`state_dict` (the unsaved parameters are left as they are)."""
        optimizers = [] if self.optimizer is None else [self.optimizer]
        set_state_dict(
            self.model,
            optimizers,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict.get("optim", {}),
            options=StateDictOptions(strict=self.saved is None),
        )


class FrozenBase(Stateful):
    """A fingerprint of the frozen base weights a LoRA checkpoint does not hold: per-tensor float64 sums
    (over all shards). Saved with the checkpoint and compared on load, so resuming on other base weights
    (another ``model.checkpoint_dir`` or ``run.seed``) is an error rather than a silently different model.

    Args:
        model: the (possibly FSDP2-sharded) model.
        is_trained: the parameters that are not the base (by name).
        device: the training device (the sums of sharded parameters are all-reduced on it).
    """

    def __init__(self, model: nn.Module, is_trained: Callable[[str], bool], device: torch.device):
        self.model = model
        self.is_trained = is_trained
        self.device = device

    def _sums(self) -> dict[str, torch.Tensor]:
        base = [(name, p) for name, p in self.model.named_parameters() if not self.is_trained(name)]
        sums = torch.zeros(len(base), dtype=torch.float64)
        sharded = torch.zeros(len(base), dtype=torch.bool)
        for i, (_, param) in enumerate(base):
            local = param.to_local() if isinstance(param, DTensor) else param
            sums[i] = torch.sum(local.detach(), dtype=torch.float64).cpu()
            sharded[i] = isinstance(param, DTensor)
        sums = torch.where(sharded, all_reduce(sums * sharded, self.device), sums)
        return {name: sums[i] for i, (name, _) in enumerate(base)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: float64 sum}`` of every base parameter (collective)."""
        return self._sums()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Compare the saved fingerprint with the current base (collective).

        Raises:
            CheckpointError: a base parameter differs from the one the checkpoint was trained on.
        """
        current = self._sums()
        differ = [
            name
            for name, value in current.items()
            if not torch.allclose(state_dict[name], value, rtol=1e-9, atol=1e-9)
        ]
        if differ:
            raise CheckpointError(
                f"the frozen base differs from the one this LoRA checkpoint was trained on ({len(differ)} "
                f"tensors, e.g. {differ[:3]}); resume with the run's model.checkpoint_dir / model.preset "
                "and run.seed (its config.toml)"
            )


class RNGState(Stateful):
    """torch, numpy and python generator states of this rank."""

    def state_dict(self) -> dict[str, Any]:
        """The three states (numpy / python pickled as objects)."""
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the states."""
        torch.set_rng_state(state_dict["torch"])
        np.random.set_state(state_dict["numpy"])
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])


def rng_key(rank: int) -> str:
    """The checkpoint key of a rank's RNG state."""
    return f"rng.rank{rank}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, info: dict[str, Any]) -> None:
    """Checksum every file of ``directory`` and write ``manifest.json`` atomically.

    Args:
        directory: a directory that DCP has finished writing.
        info: extra fields (step, stage, ...).
    """
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[path.name] = {"size": path.stat().st_size, "crc32": _file_crc32(path)}
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({**info, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint against its manifest.

    Args:
        directory: a ``step_N`` directory.

    Returns:
        The manifest.

    Raises:
        CheckpointError: the manifest is missing or unreadable, or a file is missing, has another size
            or another CRC32 (truncated or corrupted).
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST} (incomplete save)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory}: unreadable {MANIFEST}: {exc}") from None
    if ".metadata" not in files:
        raise CheckpointError(f"{directory}: manifest lists no DCP .metadata file")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: file {name} listed in the manifest is missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"{directory}: file {name} has {size} bytes, the manifest says "
                f"{expected['size']} (truncated?)"
            )
        if _file_crc32(path) != expected["crc32"]:
            raise CheckpointError(f"{directory}: file {name} fails its CRC32 check (corrupted)")
    return manifest


@dataclass(frozen=True)
class FoundCheckpoint:
    """A verified checkpoint."""

    path: Path
    step: int
    manifest: dict[str, Any]


class CheckpointManager:
    """Saves, prunes and finds checkpoints under one directory (collective: call on every rank).

    Args:
        root: the checkpoints directory (``<out>/checkpoints``).
        keep: how many complete checkpoints to keep.
        rank: this process's rank (rank 0 renames, writes manifests and prunes).
    """

    def __init__(self, root: str | os.PathLike, keep: int = 2, rank: int = 0):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.rank = rank

    def step_dir(self, step: int) -> Path:
        """The final directory of a step's checkpoint."""
        return self.root / f"step_{step:08d}"

    def complete_steps(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every ``step_N`` directory (not yet verified), newest first; a ``step_N.old``
        directory stands in for a ``step_N`` that a killed re-save left missing."""
        if not self.root.is_dir():
            return []
        found, replaced = {}, {}
        for path in self.root.iterdir():
            for pattern, into in ((_STEP_DIR, found), (_REPLACED_DIR, replaced)):
                match = pattern.match(path.name)
                if match and path.is_dir():
                    into[int(match.group(1))] = path
        return sorted({**replaced, **found}.items(), reverse=True)

    def _recover(self) -> None:
        """Finish what a killed save left: put a ``step_N.old`` back when ``step_N`` is missing (else drop
        it), and remove every ``.tmp`` directory."""
        for path in self.root.glob("step_*.old"):
            final = path.with_name(path.name.removesuffix(".old"))
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, final)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def save(self, step: int, state: dict[str, Any], info: dict[str, Any]) -> Path:
        """Write a checkpoint atomically (collective).

        Args:
            step: the global optimizer step it follows.
            state: DCP state dict (``Stateful`` values allowed).
            info: manifest fields (stage, ...).

        Returns:
            The final ``step_N`` directory.
        """
        final = self.step_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._recover()
        _barrier()
        dcp.save(state, checkpoint_id=str(tmp))
        _barrier()
        if self.rank == 0:
            write_manifest(tmp, {"step": step, **info})
            replaced = final.with_name(final.name + ".old")
            if final.exists():  # re-saving a step: keep the old copy until the new one is in place
                os.replace(final, replaced)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            shutil.rmtree(replaced, ignore_errors=True)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        for _, path in self.complete_steps()[self.keep :]:
            shutil.rmtree(path, ignore_errors=True)

    def latest(self) -> FoundCheckpoint | None:
        """The newest checkpoint that passes :func:`verify_checkpoint`; broken ones are refused with a
        warning and skipped.

        Returns:
            The checkpoint, or None when there is none.
        """
        for step, path in self.complete_steps():
            try:
                manifest = verify_checkpoint(path)
            except CheckpointError as exc:
                log.warning("refusing checkpoint: %s; falling back to the previous one", exc)
                continue
            return FoundCheckpoint(path, step, manifest)
        return None

    def resolve(self, path: str | os.PathLike | None) -> FoundCheckpoint | None:
        """A checkpoint to resume from: ``path`` itself if it is a ``step_N`` directory, else the latest
        good one under ``path`` (or under this manager's root when ``path`` is None).

        Args:
            path: a checkpoint, a checkpoints directory, a run directory, or None.

        Returns:
            The verified checkpoint, or None when there is none.
        """
        if path is None:
            return self.latest()
        path = Path(path)
        match = _STEP_DIR.match(path.name)
        if match:
            manifest = verify_checkpoint(path)
            return FoundCheckpoint(path, int(match.group(1)), manifest)
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        return CheckpointManager(root, self.keep, self.rank).latest()


def load_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Load a verified checkpoint into ``state`` in place (collective).

    Args:
        path: the ``step_N`` directory.
        state: the same structure that was saved (``Stateful`` values are restored through
            ``load_state_dict``).
    """
    dcp.load(state, checkpoint_id=str(path))


class Checkpointer:
    """The trainer's checkpoints: what a run saves and restores, under ``<out>/checkpoints`` (collective).

    Args:
        root: the checkpoints directory.
        keep: how many complete checkpoints to keep.
        rank: this process's rank.
        world_size: ranks in the job (recorded in the manifest).
    """

    def __init__(self, root: str | os.PathLike, keep: int, rank: int, world_size: int):
        self.manager = CheckpointManager(root, keep, rank)
        self.rank = rank
        self.world_size = world_size
        self.last_saved = -1
        """The step of the last checkpoint this process saved (-1: none)."""

    def find(self, resume: str | None) -> FoundCheckpoint | None:
        """The checkpoint to resume from, resolved on rank 0 and broadcast.

        Args:
            resume: a checkpoint or run directory, ``"latest"`` (the latest complete checkpoint under the
                root), or None for a fresh run.

        Returns:
            The verified checkpoint, or None (fresh run, or nothing complete found).
        """
        if resume is None:
            return None
        found = [self.manager.resolve(None if resume == "latest" else resume) if self.rank == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(found, src=0)
        return found[0]

    def _state(self, trainer_state: Stateful, stage_state: dict[str, Any]) -> dict[str, Any]:
        return {**stage_state, "trainer": trainer_state, rng_key(self.rank): RNGState()}

    def save(self, trainer_state: Any, stage_state: dict[str, Any]) -> Path:
        """Save the run's state after ``trainer_state.step`` (collective).

        Args:
            trainer_state: the trainer's counters (``Stateful``, with ``step``, ``stage``, ``stage_step``).
            stage_state: the current stage's entries (``Stage.checkpoint_state()``).

        Returns:
            The checkpoint directory.
        """
        info = {"stage": trainer_state.stage, "stage_step": trainer_state.stage_step}
        state = self._state(trainer_state, stage_state)
        path = self.manager.save(trainer_state.step, state, {**info, "world_size": self.world_size})
        self.last_saved = trainer_state.step
        return path

    def load(self, found: FoundCheckpoint, trainer_state: Stateful, stage_state: dict[str, Any]) -> None:
        """Restore a checkpoint into the trainer's counters and the (set-up) stage, in place (collective).

        Args:
            found: the checkpoint.
            trainer_state: the trainer's counters.
            stage_state: the stage's entries, built after the stage was set up for ``found``'s stage.
        """
        load_checkpoint(found.path, self._state(trainer_state, stage_state))
