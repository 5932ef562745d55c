"""Meta's consolidated checkpoint format: ``params.json`` + ``consolidated.pth`` (+ our ``value_head.pth``).

``consolidated.pth`` holds Llama keys: ``tok_embeddings.weight``,
``layers.{i}.attention.{wq,wk,wv,wo}.weight``, ``layers.{i}.feed_forward.{w1,w2,w3}.weight``,
``layers.{i}.{attention_norm,ffn_norm}.weight``, ``extra_heads.{j}.<same>``, ``norm.weight`` and
``output.weight``. Loading is strict: every key must be consumed and every shape must match.
``rope.freqs``, which Meta's released checkpoints carry, is ignored: it is a function of ``params.json``
(``dim / n_heads`` and ``rope_theta``) and the model computes its rotary tables itself.

Meta checkpoints have no critic, so the value head is initialised fresh. :func:`export_meta_checkpoint`
saves it beside the Meta files as ``value_head.pth`` (its options and its state dict); Meta's own loader
never reads it, and :func:`load_meta_checkpoint` restores it when present.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from wmtp_train.model.args import ModelArgs
from wmtp_train.model.mtp import MTPTransformer

PARAMS_FILE = "params.json"
WEIGHTS_FILE = "consolidated.pth"
VALUE_HEAD_FILE = "value_head.pth"
IGNORED_KEYS = frozenset({"rope.freqs"})

# Our module path -> Meta's key, for the only parameters whose paths differ.
_RENAMED = {"head.norm.weight": "norm.weight", "head.output.weight": "output.weight"}
_VALUE_PREFIX = "value_head."


def meta_key(name: str) -> str:
    """Meta's checkpoint key of one of our parameter names (value head excluded).

    Args:
        name: a key of ``MTPTransformer.state_dict()``.

    Returns:
        The consolidated-checkpoint key.
    """
    return _RENAMED.get(name, name)


def _meta_parameter_shapes(model: MTPTransformer) -> dict[str, tuple[int, ...]]:
    return {
        meta_key(name): tuple(param.shape)
        for name, param in model.named_parameters()
        if not name.startswith(_VALUE_PREFIX)
    }


def _weights_path(directory: Path) -> Path:
    path = directory / WEIGHTS_FILE
    if path.is_file():
        return path
    shards = sorted(directory.glob("consolidated.*.pth"))
    if len(shards) == 1:
        return shards[0]
    if shards:
        raise ValueError(
            f"{directory}: {len(shards)} model-parallel shards ({shards[0].name}, ...); only a single "
            f"{WEIGHTS_FILE} is supported (merge the shards first)"
        )
    raise FileNotFoundError(f"{directory}: no {WEIGHTS_FILE}")


def _check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise one ValueError listing every missing, unexpected and mis-shaped key."""
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {shape}"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != shape
    ]
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    non_tensors = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    if non_tensors:
        problems.append(f"non-tensor entries {non_tensors}")
    if problems:
        raise ValueError(f"{WEIGHTS_FILE} does not match params.json: " + " | ".join(problems))


@dataclass(frozen=True)
class _CheckpointFiles:
    """The parsed files of a consolidated directory (the weights memory-mapped, not read)."""

    params: dict
    state: dict[str, torch.Tensor]
    value_head: dict | None

    def args(self, **overrides) -> ModelArgs:
        params = dict(self.params)
        if params.get("vocab_size", -1) == -1 and "tok_embeddings.weight" in self.state:
            params["vocab_size"] = self.state["tok_embeddings.weight"].shape[0]
        if self.value_head is not None:
            overrides = {**self.value_head["options"], **overrides}
        return ModelArgs.from_params_json(params, **overrides)


def _value_head_options(args: ModelArgs) -> dict[str, str]:
    return {"value_head": args.value_head, "value_output": args.value_output}


def _read_checkpoint(directory: Path) -> _CheckpointFiles:
    params_path = directory / PARAMS_FILE
    if not params_path.is_file():
        raise FileNotFoundError(f"{directory}: no {PARAMS_FILE}")
    params = json.loads(params_path.read_text())
    state = torch.load(_weights_path(directory), map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{WEIGHTS_FILE} must hold a dict of tensors, got {type(state).__name__}")
    state = {key: value for key, value in state.items() if key not in IGNORED_KEYS}
    value_head_path = directory / VALUE_HEAD_FILE
    value_head = None
    if value_head_path.is_file():
        value_head = torch.load(value_head_path, map_location="cpu", weights_only=True)
    return _CheckpointFiles(params, state, value_head)


def checkpoint_args(directory: str | os.PathLike, **arg_overrides) -> ModelArgs:
    """The :class:`ModelArgs` of a consolidated checkpoint, exactly as :func:`load_meta_checkpoint` builds
    them: ``params.json``, ``vocab_size`` from ``tok_embeddings.weight`` when it says -1 (as Llama 2's
    does), and the value head options saved in ``value_head.pth`` when present.

    Args:
        directory: holds ``params.json`` and ``consolidated.pth`` (memory-mapped, not read).
        arg_overrides: :class:`ModelArgs` fields overriding all of the above (``max_seq_len``, ...).

    Returns:
        The validated arguments.
    """
    return _read_checkpoint(Path(directory)).args(**arg_overrides)


def load_meta_checkpoint(
    directory: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    **arg_overrides,
) -> tuple[MTPTransformer, ModelArgs]:
    """Load a Meta MTP (or plain Llama, H = 1) consolidated checkpoint.

    The model is built on the meta device and the checkpoint tensors (memory-mapped) are assigned to
    it, so host memory holds one copy at most. The value head comes from ``value_head.pth`` when the
    directory has one (a checkpoint written by :func:`export_meta_checkpoint`), else it is fresh.

    Args:
        directory: holds ``params.json`` and ``consolidated.pth``.
        device: where the parameters go.
        dtype: parameter dtype (default: the checkpoint's, e.g. bf16 for Meta's releases).
        arg_overrides: :class:`ModelArgs` fields overriding the checkpoint's (see :func:`checkpoint_args`).

    Returns:
        ``(model, args)``; the model is in train mode with every parameter requiring grad.
    """
    files = _read_checkpoint(Path(directory))
    args = files.args(**arg_overrides)
    with torch.device("meta"):
        model = MTPTransformer(args)
    state = files.state
    _check_state_dict(state, _meta_parameter_shapes(model))
    dtype = dtype if dtype is not None else state["tok_embeddings.weight"].dtype
    by_name = {
        name: state[meta_key(name)].to(device=device, dtype=dtype)
        for name, _ in model.named_parameters()
        if not name.startswith(_VALUE_PREFIX)
    }
    model.load_state_dict(by_name, strict=False, assign=True)
    model.value_head.to_empty(device=device)
    model.value_head.to(dtype)
    if files.value_head is not None and files.value_head["options"] == _value_head_options(args):
        model.value_head.load_state_dict(files.value_head["state_dict"])
    else:
        model.value_head.init_weights()
    return model, args


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(temp_path)`` into a temp file beside ``path``, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_meta_checkpoint(model: MTPTransformer, directory: str | os.PathLike) -> Path:
    """Write ``params.json``, ``consolidated.pth`` (Meta's keys) and ``value_head.pth``.

    Every file is written to a temp file and renamed, so a crash never leaves a truncated file. Call it
    on an unsharded model (under FSDP2, gather a full state dict first).

    Args:
        model: the model to export.
        directory: created if needed.

    Returns:
        The directory.
    """
    if not isinstance(model, MTPTransformer):
        raise TypeError(f"model must be an MTPTransformer, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta_state, value_state = {}, {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        if name.startswith(_VALUE_PREFIX):
            value_state[name.removeprefix(_VALUE_PREFIX)] = tensor
        else:
            meta_state[meta_key(name)] = tensor
    value_options = _value_head_options(model.args)
    params_text = json.dumps(model.args.to_params_json(), indent=2) + "\n"

    _atomic_write(directory / WEIGHTS_FILE, lambda tmp: torch.save(meta_state, tmp))
    _atomic_write(
        directory / VALUE_HEAD_FILE,
        lambda tmp: torch.save({"options": value_options, "state_dict": value_state}, tmp),
    )
    _atomic_write(directory / PARAMS_FILE, lambda tmp: Path(tmp).write_text(params_text))
    return directory
