"""Stage 0, and every parallelism decision of the run: process group, per-rank seeds, FSDP2 sharding of
the MTP model, and the collectives the trainer reduces its counts and metrics with.

Works under ``torchrun`` (reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``) and as a plain single
process (a one-rank group on an in-memory store), so the same code path runs everywhere.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from wmtp_train.config import ParallelConfig
from wmtp_train.model import MTPTransformer


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 (the one that logs, renames checkpoints and exports)."""
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the default process group (nccl on CUDA, gloo on CPU) if it is not yet.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        The rank, world size and device of this process.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device='cuda' but CUDA is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, local_world, dev)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) with ``seed``.

    Args:
        seed: the seed (the trainer passes ``base_seed + rank``).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mixed_precision_policy(setting: str, device: torch.device) -> MixedPrecisionPolicy | None:
    """bf16 parameters with fp32 gradient reduction on CUDA (``auto`` / ``bf16``); None = full fp32.

    Args:
        setting: ``auto``, ``bf16`` or ``none``.
        device: the training device; ``auto`` means bf16 only on CUDA.

    Returns:
        The policy for ``fully_shard`` or None.
    """
    if setting == "none" or (setting == "auto" and device.type != "cuda"):
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_model(model: MTPTransformer, mp_policy: MixedPrecisionPolicy | None) -> MTPTransformer:
    """Apply FSDP2: each transformer block, then the output head, then the value head, then the root.

    The output head (shared norm + unembedding) owns the loss computation in its ``forward``, so FSDP2
    all-gathers those parameters around the loss kernel. ``trunk_forward`` and ``full_forward`` are
    registered as forward methods so that calling them on the root also gathers the embedding.
    Every group, the root included, reshards after forward: no-grad passes (evaluation, Rho-1 scoring,
    the reference model) have no backward that would reshard the root, and an unsharded root would hand
    unsharded parameters to ``model.parameters()`` (the optimizer, checkpoints).

    Args:
        model: the model (on the meta device or materialised).
        mp_policy: mixed precision policy or None.

    Returns:
        The same model object, now an FSDP module.
    """
    kwargs: dict = {"reshard_after_forward": True}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in [*model.layers, *model.extra_heads]:
        fully_shard(block, **kwargs)
    fully_shard(model.head, **kwargs)
    fully_shard(model.value_head, **kwargs)
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, "trunk_forward")
    register_fsdp_forward_method(model, "full_forward")
    return model


def parallelize_model(
    model: MTPTransformer, settings: ParallelConfig, device: torch.device
) -> MTPTransformer:
    """Apply the run's parallelism to a freshly built (meta-device) model: FSDP2 when ``settings.fsdp``,
    with the mixed precision policy of ``settings.mixed_precision`` on ``device``.

    Args:
        model: the model, not yet materialised.
        settings: the ``[parallel]`` configuration.
        device: the training device.

    Returns:
        The same model object (an FSDP module when sharded).
    """
    if settings.fsdp:
        shard_model(model, mixed_precision_policy(settings.mixed_precision, device))
    return model


def all_reduce(t: torch.Tensor, device: torch.device, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a (CPU) tensor over the default group on the training device; a no-op on one rank.

    Args:
        t: the tensor (any device).
        device: the training device (gloo reduces on CPU, nccl on CUDA).
        op: the reduction (``SUM``, ``MIN``, ``MAX``, ...).

    Returns:
        The reduced tensor on the CPU.
    """
    t = t.to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.cpu()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly) sharded DTensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t
