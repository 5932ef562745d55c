"""Stage 0, and every parallelism decision of the run: process group, per-rank seeds, activation
checkpointing, per-block compilation and FSDP2 sharding of the MTP model, and the collectives the trainer
reduces its counts and metrics with.

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
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
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


def transformer_blocks(model: MTPTransformer) -> list[nn.Module]:
    """The model's transformer blocks in the order checkpointing counts them: the trunk, head 1's block
    (``layers[-1]``), then the heads 2..H (``extra_heads``)."""
    return [*model.layers, *model.extra_heads]


def checkpointed_blocks(model: MTPTransformer, mode: str) -> list[nn.Module]:
    """The blocks that ``parallel.activation_checkpoint = mode`` recomputes in backward.

    ``none``: no block. ``full``: every block. ``selective``: every other block (the 1st, 3rd, ... of
    :func:`transformer_blocks`), which keeps about half of the blocks' activations for about half of
    ``full``'s recomputation. The output head, and with it the fused loss, is never checkpointed: the
    loss saves nothing for backward (its gradients are computed in its forward pass), so recomputing it
    would cost a whole extra pass over the vocabulary for no memory saved.

    Args:
        model: the model.
        mode: ``none``, ``full`` or ``selective``.

    Returns:
        The blocks.
    """
    blocks = transformer_blocks(model)
    return {"none": [], "full": blocks, "selective": blocks[::2]}[mode]


def apply_activation_checkpointing(model: MTPTransformer, mode: str) -> None:
    """Non-reentrant activation checkpointing of :func:`checkpointed_blocks` (the composable API: module
    hooks, so parameter names and the module tree stay as they are). Must precede ``fully_shard``.

    Args:
        model: the model, not yet sharded.
        mode: ``none``, ``full`` or ``selective``.
    """
    for block in checkpointed_blocks(model, mode):
        checkpoint(block, preserve_rng_state=False)  # no randomness in the blocks (no dropout)


def compile_blocks(model: MTPTransformer) -> None:
    """``torch.compile`` each transformer block's ``forward`` (fullgraph): the blocks share one compiled
    graph, while the module hooks (FSDP2's all-gathers, activation checkpointing) stay eager around it.

    Args:
        model: the model.
    """
    for block in transformer_blocks(model):
        block.forward = torch.compile(block.forward, fullgraph=True)


def shard_model(
    model: MTPTransformer, mp_policy: MixedPrecisionPolicy | None, mesh: DeviceMesh
) -> MTPTransformer:
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
        mesh: the data-parallel device mesh.

    Returns:
        The same model object, now an FSDP module.
    """
    kwargs: dict = {"reshard_after_forward": True, "mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model.head, **kwargs)
    fully_shard(model.value_head, **kwargs)
    fully_shard(model, **kwargs)
    register_fsdp_forward_method(model, "trunk_forward")
    register_fsdp_forward_method(model, "full_forward")
    return model


def refresh_trainable_parameters(model: nn.Module) -> None:
    """Let FSDP2 see which parameters require grad now (call after a stage changes ``requires_grad``).

    FSDP2 derives each group's gradient dtypes (mixed precision: bf16 gradients reduced in fp32 and kept
    fp32) from the parameters that require grad when the group is initialised, at the first forward. A
    group frozen then (stage 1's trunk and heads) would later reduce and store bf16 gradients for fp32
    parameters, which fails. Gathering and releasing each group once re-derives them; it also creates the
    groups' unsharded parameters, which the memory tracker reads even for groups a stage never runs.

    Args:
        model: the model (a no-op for groups that are not sharded).
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
            module.reshard()


def parallelize_model(
    model: MTPTransformer, settings: ParallelConfig, device: torch.device, mesh: DeviceMesh | None = None
) -> MTPTransformer:
    """Apply the run's parallelism to a freshly built (meta-device) model, in torchtitan's order:
    activation checkpointing (``settings.activation_checkpoint``), per-block ``torch.compile``
    (``settings.compile``), then FSDP2 when ``settings.fsdp``, with the mixed precision policy of
    ``settings.mixed_precision`` on ``device``.

    Args:
        model: the model, not yet materialised.
        settings: the ``[parallel]`` configuration.
        device: the training device (it decides the mixed precision policy).
        mesh: the data-parallel mesh; default: one over the whole job on ``device``. The memory estimator
            passes a CPU mesh of a fake process group while ``device`` is the device it estimates.

    Returns:
        The same model object (an FSDP module when sharded).
    """
    apply_activation_checkpointing(model, settings.activation_checkpoint)
    if settings.compile:
        compile_blocks(model)
    if settings.fsdp:
        if mesh is None:
            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        shard_model(model, mixed_precision_policy(settings.mixed_precision, device), mesh)
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
