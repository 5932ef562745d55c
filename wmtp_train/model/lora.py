"""LoRA for the MTP Llama: low-rank adapters inside the blocks' projections, merging, and the adapters file.

A targeted projection ``W`` (d_out x d_in, frozen) becomes ``y = x W^T + (alpha / r) * B(A(dropout(x)))``
with ``A`` (r x d_in, Kaiming-uniform) and ``B`` (d_out x r, zeros), so an adapted model starts equal to its
base. :class:`LoRALinear` is an ``nn.Linear`` that keeps the base weight under its own name (``wq.weight``,
so Meta's key mapping is untouched) and holds the adapters as submodules ``lora_a`` / ``lora_b``: they live
inside the block, so per-block FSDP2 sharding, mixed precision and activation checkpointing of a block
cover them with no extra wrapping.

What a LoRA run trains (:meth:`LoRAOptions.is_trained`): the adapters, the value head, and the shared
norm + unembedding when ``train_output_head``. Everything else is the frozen base: it is not saved in
checkpoints and is reloaded from its source (the Meta checkpoint or the seeded initial weights).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wmtp_train.model.meta_checkpoint import _atomic_write

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
"""Projections LoRA can adapt: attention ``wq, wk, wv, wo`` and SwiGLU ``w1, w2, w3``."""
ADAPTERS_FILE = "lora_adapters.pth"
"""The adapters-only export: ``{"options", "base", "state_dict"}`` (see :func:`export_lora_adapters`)."""
_ADAPTER_MODULES = ("lora_a", "lora_b")


def _target_list(where: str, text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(set(names) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"{where}: unknown projections {unknown}; choose from {LORA_TARGETS}")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: a projection is listed twice in {text!r}")
    return names


@dataclass(frozen=True)
class LoRAOptions:
    """The ``[lora]`` table: low-rank adapters instead of full fine-tuning (``README.md``, "LoRA")."""

    enabled: bool = False
    """Train adapters (plus the value head, plus ``train_output_head``) instead of every parameter."""
    rank: int = 16
    """Adapter rank r."""
    alpha: float = 32.0
    """The adapter output is scaled by ``alpha / rank``."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only; the base path never sees it)."""
    trunk_targets: str = "wq,wk,wv,wo,w1,w2,w3"
    """Comma-separated projections adapted in the trunk blocks (``layers[:-1]``); empty = none."""
    head_targets: str = "wq,wk,wv,wo,w1,w2,w3"
    """Comma-separated projections adapted in the H head blocks (``layers[-1]``, the next-token head,
    and ``extra_heads``); empty = none."""
    train_output_head: bool = False
    """Also train the shared final norm and unembedding fully (V x d parameters more, saved in every
    checkpoint)."""

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        trunk = _target_list("lora.trunk_targets", self.trunk_targets)
        heads = _target_list("lora.head_targets", self.head_targets)
        if self.enabled and not trunk and not heads:
            raise ValueError("lora.enabled with empty lora.trunk_targets and lora.head_targets: no adapter")

    @property
    def scaling(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank

    def targets(self, part: str) -> tuple[str, ...]:
        """The adapted projections of ``part`` (``"trunk"`` or ``"heads"``)."""
        if part not in ("trunk", "heads"):
            raise ValueError(f"part must be 'trunk' or 'heads', got {part!r}")
        text = self.trunk_targets if part == "trunk" else self.head_targets
        return _target_list(f"lora.{'trunk' if part == 'trunk' else 'head'}_targets", text)

    def is_trained(self, name: str) -> bool:
        """Whether LoRA trains the parameter ``name`` (a model state-dict key; wrapper prefixes such as
        activation checkpointing's are ignored): an adapter, the value head, or the output head when
        ``train_output_head``."""
        parts = name.split(".")
        if any(part in _ADAPTER_MODULES for part in parts):
            return True
        top = next((part for part in parts if not part.startswith("_")), "")
        return top == "value_head" or (top == "head" and self.train_output_head)


class LoRALinear(nn.Linear):
    """A bias-free ``nn.Linear`` plus a low-rank update: ``F.linear(x, weight) + scaling * B(A(dropout(x)))``.

    Args:
        in_features: input width.
        out_features: output width.
        rank: adapter rank r.
        scaling: ``alpha / r``.
        dropout: dropout probability on the adapter input.
        device: where to allocate (``meta`` for a model sharded before it is materialised).
        dtype: parameter dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        scaling: float,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.reset_adapters()

    def reset_adapters(self) -> None:
        """A Kaiming-uniform (as ``nn.Linear``), B zero: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_features] -> [..., out_features]``."""
        return F.linear(x, self.weight) + self.lora_b(self.lora_a(self.dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        """Shapes, rank and scaling."""
        return f"{super().extra_repr()}, rank={self.lora_a.out_features}, scaling={self.scaling:g}"


def apply_lora(model: nn.Module, options: LoRAOptions) -> list[str]:
    """Replace the targeted projections of ``model``'s blocks by :class:`LoRALinear`, in place.

    The base weight ``Parameter`` is kept (not copied), so this works on a meta-device model before
    sharding as well as on a materialised one; on a materialised model the adapters are initialised with
    the current torch RNG (A random, B zero).

    Args:
        model: an ``MTPTransformer`` (``layers``, ``extra_heads``), not yet sharded.
        options: the LoRA options (``enabled`` is not consulted: the caller decides).

    Returns:
        The qualified names of the adapted projections.
    """
    n_layers = len(model.layers)
    blocks = [("trunk", f"layers.{i}", block) for i, block in enumerate(model.layers[:-1])]
    blocks.append(("heads", f"layers.{n_layers - 1}", model.layers[-1]))
    blocks += [("heads", f"extra_heads.{i}", block) for i, block in enumerate(model.extra_heads)]
    wrapped = []
    for part, prefix, block in blocks:
        for target in options.targets(part):
            owner_name = "attention" if target in ("wq", "wk", "wv", "wo") else "feed_forward"
            owner = getattr(block, owner_name)
            base = getattr(owner, target)
            name = f"{prefix}.{owner_name}.{target}"
            if type(base) is not nn.Linear or base.bias is not None:
                raise ValueError(f"{name}: expected a bias-free nn.Linear, got {base!r} (applied twice?)")
            adapted = LoRALinear(
                base.in_features,
                base.out_features,
                options.rank,
                options.scaling,
                options.dropout,
                device="meta",
                dtype=base.weight.dtype,
            )
            adapted.weight = base.weight
            if base.weight.device.type != "meta":
                adapted.lora_a.to_empty(device=base.weight.device)
                adapted.lora_b.to_empty(device=base.weight.device)
                adapted.reset_adapters()
            setattr(owner, target, adapted)
            wrapped.append(name)
    return wrapped


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Fold every adapter pair of a full state dict into its base weight: ``W + scaling * B @ A``.

    Computed in float32 and cast back to ``W``'s dtype; the adapter keys are dropped, so the result
    loads into the plain (un-adapted) model.

    Args:
        state: a full (unsharded) state dict of an adapted model.
        scaling: ``alpha / rank``.

    Returns:
        A new state dict with plain keys only.
    """
    merged = {
        key: value for key, value in state.items() if not key.endswith(("lora_a.weight", "lora_b.weight"))
    }
    for key in state:
        if key.endswith(".lora_a.weight"):
            prefix = key.removesuffix(".lora_a.weight")
            base = state[f"{prefix}.weight"]
            delta = state[f"{prefix}.lora_b.weight"].float() @ state[key].float()
            merged[f"{prefix}.weight"] = (base.float() + scaling * delta).to(base.dtype)
    return merged


def export_lora_adapters(
    state: dict[str, torch.Tensor], options: LoRAOptions, base: dict[str, Any], directory: str | os.PathLike
) -> Path:
    """Write the adapters-only file :data:`ADAPTERS_FILE` (atomically): what LoRA trained, nothing else.

    Args:
        state: a full state dict of the adapted model (only the keys ``options.is_trained`` are kept).
        options: the run's LoRA options (saved, so the file re-creates the adapters by itself).
        base: where the frozen base comes from (``model.checkpoint_dir`` / ``model.preset``, ``run.seed``).
        directory: the export directory (created if needed).

    Returns:
        The file's path.
    """
    trained = {
        key: value.detach().cpu().contiguous() for key, value in state.items() if options.is_trained(key)
    }
    payload = {"options": dataclasses.asdict(options), "base": base, "state_dict": trained}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ADAPTERS_FILE
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def load_lora_adapters(model: nn.Module, path: str | os.PathLike) -> LoRAOptions:
    """Adapt a base model (e.g. from :func:`~wmtp_train.model.load_meta_checkpoint`) with an adapters
    file: :func:`apply_lora` with the file's options, then its tensors, strictly.

    Args:
        model: the un-adapted base ``MTPTransformer`` (materialised).
        path: an adapters file, or a directory holding :data:`ADAPTERS_FILE`.

    Returns:
        The file's LoRA options.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTERS_FILE
    payload = torch.load(path, map_location="cpu", weights_only=True)
    options = LoRAOptions(**payload["options"])
    apply_lora(model, options)
    expected = {key for key in model.state_dict() if options.is_trained(key)}
    missing, unexpected = (
        sorted(expected - set(payload["state_dict"])),
        sorted(set(payload["state_dict"]) - expected),
    )
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model: missing keys {missing}, unexpected keys {unexpected}"
        )
    model.load_state_dict(payload["state_dict"], strict=False)
    return options
