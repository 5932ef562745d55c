"""A lazy JSONL dataset over an offset index, tokenisation with the prompt masked, and collation.

Tokenisation of a record is ``bos + prompt + completion + eos``. Only the completion tokens (and the
eos that ends them) are trained and weighted; bos and the prompt are context.

Truncation policy when that sequence is longer than ``max_len``: bos is always kept; the completion keeps
its head and gets at least half of the remaining room (all of it if shorter), the prompt keeps its tail
(the part adjacent to the completion) in what is left. When the completion is cut, its eos is dropped
(the sequence does not end there). The record's reward still describes the whole program.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wmtp_kernels import IGNORE_INDEX
from wmtp_train.data.index import OffsetIndex
from wmtp_train.data.records import DEFAULT_MAX_RECORD_BYTES, CodeRecord, parse_record_line

PADDING_SIDES = ("right", "left")
MIN_MAX_LEN = 4


@dataclass(frozen=True)
class Sample:
    """One tokenised record.

    Attributes:
        input_ids: bos + prompt + completion (+ eos), possibly truncated.
        n_context: how many leading tokens (bos + prompt) are not trained.
        reward: 1.0 if the record is correct else 0.0.
        difficulty: 1..11.
        task_id: the record's task.
        truncated: whether the truncation policy cut anything.
    """

    input_ids: list[int]
    n_context: int
    reward: float
    difficulty: int
    task_id: str
    truncated: bool = False


def encode_prompt(tokenizer, prompt: str | Sequence[int], room: int | None = None) -> tuple[list[int], bool]:
    """``bos + prompt``: the context every sequence starts with, in training, evaluation and generation.

    Args:
        tokenizer: any tokenizer of ``wmtp_train.data.tokenizer``.
        prompt: the prompt text, or its token ids (without bos).
        room: most tokens allowed, bos included (>= 1); a longer prompt keeps its tail, the part next to
            what follows it. None: no limit.

    Returns:
        ``(ids, truncated)``.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if room is not None and room < 1:
        raise ValueError(f"room must be >= 1 token (bos), got {room}")
    truncated = room is not None and len(ids) > room - 1
    if truncated:
        ids = ids[len(ids) - (room - 1) :]
    return [tokenizer.bos_id, *ids], truncated


def tokenize_record(record: CodeRecord, tokenizer, max_len: int) -> Sample:
    """Tokenise a record with the module's truncation policy.

    Args:
        record: the record.
        tokenizer: any tokenizer of ``wmtp_train.data.tokenizer``.
        max_len: the maximum number of tokens (>= 4).

    Returns:
        The sample; it has at least one trained (completion) token.
    """
    if max_len < MIN_MAX_LEN:
        raise ValueError(f"max_len must be >= {MIN_MAX_LEN}, got {max_len}")
    prompt = tokenizer.encode(record.prompt)
    completion = tokenizer.encode(record.completion) + [tokenizer.eos_id]
    room = max_len - 1
    n_prompt = len(prompt)
    truncated = n_prompt + len(completion) > room
    if truncated:
        n_completion = min(len(completion), max(room - n_prompt, room // 2))
        n_prompt = room - n_completion
        completion = completion[:n_completion]
    context, _ = encode_prompt(tokenizer, prompt, room=1 + n_prompt)
    return Sample(
        input_ids=[*context, *completion],
        n_context=len(context),
        reward=1.0 if record.is_correct else 0.0,
        difficulty=record.difficulty,
        task_id=record.task_id,
        truncated=truncated,
    )


class LazyJsonlDataset(torch.utils.data.Dataset):
    """Records of a JSONL file, read one line at a time through the offset index.

    Memory holds the index (offsets and sampler metadata), never the texts. Reads use ``os.pread`` on a
    descriptor opened per process, so DataLoader workers do not share a file position. Every read checks
    the file's size and mtime against the index (:class:`~wmtp_train.data.index.StaleIndexError`).
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer,
        max_len: int,
        on_error: str = "raise",
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        cache_index: bool = True,
    ):
        """Index (or load the cached index of) a JSONL file.

        Args:
            path: the JSONL file of records.
            tokenizer: any tokenizer of ``wmtp_train.data.tokenizer``.
            max_len: maximum tokens per sample (>= 4); longer records are truncated (module docstring).
            on_error: ``"raise"`` (error with file:line) or ``"skip"`` (count and log) for invalid lines.
            max_record_bytes: lines longer than this are invalid.
            cache_index: read/write the ``<path>.offsets.json`` cache.
        """
        if max_len < MIN_MAX_LEN:
            raise ValueError(f"max_len must be >= {MIN_MAX_LEN}, got {max_len}")
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.index = OffsetIndex.load_or_build(self.path, on_error, max_record_bytes, cache=cache_index)
        self._fd: int | None = None
        self._fd_pid: int | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = state["_fd_pid"] = None
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            os.close(self._fd)

    def _descriptor(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._fd_pid = os.getpid()
        return self._fd

    def record(self, i: int) -> CodeRecord:
        """Read and parse record ``i``.

        Args:
            i: record index in ``[-len, len)``.

        Returns:
            The record.
        """
        line, where = self._line(i)
        return parse_record_line(line, where, self.index.max_record_bytes)

    def field(self, i: int, name: str) -> Any:
        """Field ``name`` of record ``i`` as the file has it, None when absent: the fields a
        :class:`CodeRecord` does not keep, such as a synthetic record's ``variant``.

        Args:
            i: record index in ``[-len, len)``.
            name: the JSON key.
        """
        line, _ = self._line(i)
        return json.loads(line).get(name)

    def _line(self, i: int) -> tuple[bytes, str]:
        """The raw line of record ``i`` and its ``file:line`` location."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} records")
        i %= n
        fd = self._descriptor()
        self.index.check_fresh(os.fstat(fd))
        offset, length = int(self.index.offsets[i]), int(self.index.lengths[i])
        return os.pread(fd, length, offset), f"{self.path}:{int(self.index.line_numbers[i])}"

    def __getitem__(self, i: int) -> Sample:
        return tokenize_record(self.record(i), self.tokenizer, self.max_len)


def collate(
    batch: Sequence[Sample],
    pad_id: int,
    padding_side: str = "right",
    ignore_index: int = IGNORE_INDEX,
) -> dict:
    """Pad a list of samples into training tensors.

    Args:
        batch: samples from :class:`LazyJsonlDataset` (non-empty).
        pad_id: the token id written at padding positions.
        padding_side: ``"right"`` or ``"left"``.
        ignore_index: label value of positions that are not trained.

    Returns:
        ``input_ids`` [B,T] int64; ``attention_mask`` [B,T] int64 (1 = real token); ``labels`` [B,T]
        int64 (input ids, ``ignore_index`` at bos/prompt/padding); ``loss_mask`` [B,T] int64 (1 =
        completion token); ``rewards`` [B] float32; ``difficulty`` [B] int64; ``task_ids`` list[str].
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if len(batch) == 0:
        raise ValueError("batch is empty")
    for j, sample in enumerate(batch):
        if not isinstance(sample, Sample):
            raise TypeError(f"batch[{j}] must be a Sample, got {type(sample).__name__}")
        if not 0 <= sample.n_context < len(sample.input_ids):
            raise ValueError(
                f"batch[{j}] ({sample.task_id}): n_context={sample.n_context} leaves no trained token "
                f"in {len(sample.input_ids)} tokens"
            )
    width = max(len(s.input_ids) for s in batch)
    shape = (len(batch), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.int64)
    attention_mask = torch.zeros(shape, dtype=torch.int64)
    loss_mask = torch.zeros(shape, dtype=torch.int64)
    for row, sample in enumerate(batch):
        n = len(sample.input_ids)
        start = 0 if padding_side == "right" else width - n
        input_ids[row, start : start + n] = torch.tensor(sample.input_ids, dtype=torch.int64)
        attention_mask[row, start : start + n] = 1
        loss_mask[row, start + sample.n_context : start + n] = 1
    labels = input_ids.masked_fill(loss_mask == 0, ignore_index)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "loss_mask": loss_mask,
        "rewards": torch.tensor([s.reward for s in batch], dtype=torch.float32),
        "difficulty": torch.tensor([s.difficulty for s in batch], dtype=torch.int64),
        "task_ids": [s.task_id for s in batch],
    }
