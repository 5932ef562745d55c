"""Byte-offset index over a JSONL file of records: metadata only, never the texts.

The index is built once by scanning the file (every line is parsed and validated, then dropped), and
cached beside it as ``<file>.offsets.json``. It keeps, per valid record, the byte offset and length of
its line, its 1-based line number (for error messages) and what samplers need: ``is_correct``,
``difficulty`` and ``task_id`` (as an index into the list of distinct task ids).

A file is identified by a fingerprint (size, mtime_ns, SHA-256 of its first and last KiB). A cache whose
fingerprint differs is rebuilt; a file that changes while a dataset reads it is detected on every read
by a size + mtime check and raises :class:`StaleIndexError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from wmtp_train.data.records import (
    DEFAULT_MAX_RECORD_BYTES,
    RecordError,
    parse_record_line,
    validate_error_policy,
)

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".offsets.json"
_INDEX_VERSION = 1
_EDGE_BYTES = 1024


class StaleIndexError(RuntimeError):
    """The data file changed after its offset index was built."""


@dataclass(frozen=True)
class FileFingerprint:
    """What identifies one version of a file."""

    size: int
    mtime_ns: int
    edge_sha256: str

    @classmethod
    def of(cls, path: Path) -> FileFingerprint:
        """Fingerprint ``path`` now.

        Args:
            path: the file.

        Returns:
            Its fingerprint.
        """
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            digest = hashlib.sha256(f.read(_EDGE_BYTES))
            if st.st_size > _EDGE_BYTES:
                f.seek(max(_EDGE_BYTES, st.st_size - _EDGE_BYTES))
                digest.update(f.read(_EDGE_BYTES))
        return cls(size=st.st_size, mtime_ns=st.st_mtime_ns, edge_sha256=digest.hexdigest())


def index_path_for(path: str | Path) -> Path:
    """Where the index of ``path`` is cached.

    Args:
        path: the JSONL file.

    Returns:
        ``<path>.offsets.json``.
    """
    path = Path(path)
    return path.with_name(path.name + INDEX_SUFFIX)


class OffsetIndex:
    """Offsets and sampler metadata of the valid records of one JSONL file.

    Attributes:
        path: the JSONL file.
        fingerprint: the file version the index describes.
        offsets, lengths, line_numbers: int64 arrays, one entry per valid record.
        is_correct: bool array; difficulty: int64 array; task_index: int64 array into ``task_ids``.
        task_ids: the distinct task ids in first-seen order.
        n_skipped: how many non-blank lines were invalid (skipped).
        first_error: the message of the first invalid line, if any.
        max_record_bytes: the over-long threshold the index was validated with.
    """

    def __init__(
        self,
        path: Path,
        fingerprint: FileFingerprint,
        columns: dict[str, np.ndarray],
        task_ids: list[str],
        n_skipped: int,
        first_error: str | None,
        max_record_bytes: int,
    ):
        """Wrap already-computed columns; use :meth:`build` or :meth:`load_or_build` instead."""
        self.path = path
        self.fingerprint = fingerprint
        self.offsets = columns["offsets"].astype(np.int64)
        self.lengths = columns["lengths"].astype(np.int64)
        self.line_numbers = columns["line_numbers"].astype(np.int64)
        self.is_correct = columns["is_correct"].astype(bool)
        self.difficulty = columns["difficulty"].astype(np.int64)
        self.task_index = columns["task_index"].astype(np.int64)
        self.task_ids = task_ids
        self.n_skipped = n_skipped
        self.first_error = first_error
        self.max_record_bytes = max_record_bytes

    def __len__(self) -> int:
        return len(self.offsets)

    def task_id(self, i: int) -> str:
        """The task id of record ``i``."""
        return self.task_ids[int(self.task_index[i])]

    @classmethod
    def build(
        cls,
        path: str | Path,
        on_error: str = "raise",
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> OffsetIndex:
        """Scan the file, validating every line.

        Args:
            path: the JSONL file.
            on_error: ``"raise"`` on the first invalid line, or ``"skip"`` invalid lines.
            max_record_bytes: lines longer than this are invalid (over-long).

        Returns:
            The index (not written to disk).
        """
        validate_error_policy(on_error)
        path = Path(path)
        fingerprint = FileFingerprint.of(path)
        cols: dict[str, list[int]] = {
            k: [] for k in ("offsets", "lengths", "line_numbers", "is_correct", "difficulty", "task_index")
        }
        task_ids: list[str] = []
        task_pos: dict[str, int] = {}
        n_skipped, first_error = 0, None
        offset = 0
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                try:
                    record = parse_record_line(line, f"{path}:{line_no}", max_record_bytes)
                except RecordError as exc:
                    if on_error == "raise":
                        raise
                    n_skipped += 1
                    first_error = first_error or str(exc)
                    continue
                cols["offsets"].append(start)
                cols["lengths"].append(len(line))
                cols["line_numbers"].append(line_no)
                cols["is_correct"].append(int(record.is_correct))
                cols["difficulty"].append(record.difficulty)
                if record.task_id not in task_pos:
                    task_pos[record.task_id] = len(task_ids)
                    task_ids.append(record.task_id)
                cols["task_index"].append(task_pos[record.task_id])
        if offset != fingerprint.size:
            raise StaleIndexError(f"{path}: file changed while it was being indexed")
        if n_skipped:
            log.warning("%s: skipped %d invalid record line(s); first: %s", path, n_skipped, first_error)
        columns = {k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}
        return cls(path, fingerprint, columns, task_ids, n_skipped, first_error, max_record_bytes)

    @classmethod
    def load_or_build(
        cls,
        path: str | Path,
        on_error: str = "raise",
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        cache: bool = True,
    ) -> OffsetIndex:
        """The index of ``path``: from its cache when that matches the file, else built (and cached).

        Args:
            path: the JSONL file.
            on_error: ``"raise"`` or ``"skip"``; with ``"raise"`` a cached index that recorded skipped
                lines raises the first of those errors.
            max_record_bytes: lines longer than this are invalid (over-long).
            cache: read and write ``<path>.offsets.json``.

        Returns:
            The index.
        """
        validate_error_policy(on_error)
        path = Path(path)
        index = cls._load_cached(path, max_record_bytes) if cache else None
        if index is None:
            index = cls.build(path, on_error, max_record_bytes)
            if cache:
                index.save()
        elif index.n_skipped:
            if on_error == "raise":
                raise RecordError(index.first_error)
            log.warning(
                "%s: skipped %d invalid record line(s); first: %s", path, index.n_skipped, index.first_error
            )
        return index

    @classmethod
    def _load_cached(cls, path: Path, max_record_bytes: int) -> OffsetIndex | None:
        cache_path = index_path_for(path)
        try:
            payload = json.loads(cache_path.read_text())
            if payload["version"] != _INDEX_VERSION or payload["max_record_bytes"] != max_record_bytes:
                return None
            fingerprint = FileFingerprint(**payload["fingerprint"])
            if fingerprint != FileFingerprint.of(path):
                return None
            columns = {k: np.asarray(v, dtype=np.int64) for k, v in payload["columns"].items()}
            return cls(
                path,
                fingerprint,
                columns,
                list(payload["task_ids"]),
                int(payload["n_skipped"]),
                payload["first_error"],
                max_record_bytes,
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: ignoring unreadable index cache (%s)", cache_path, exc)
            return None

    def save(self) -> None:
        """Write the cache file atomically (temp file + rename); a read-only directory only warns."""
        payload = {
            "version": _INDEX_VERSION,
            "fingerprint": asdict(self.fingerprint),
            "max_record_bytes": self.max_record_bytes,
            "n_skipped": self.n_skipped,
            "first_error": self.first_error,
            "task_ids": self.task_ids,
            "columns": {
                "offsets": self.offsets.tolist(),
                "lengths": self.lengths.tolist(),
                "line_numbers": self.line_numbers.tolist(),
                "is_correct": self.is_correct.astype(np.int64).tolist(),
                "difficulty": self.difficulty.tolist(),
                "task_index": self.task_index.tolist(),
            },
        }
        cache_path = index_path_for(self.path)
        try:
            fd, tmp = tempfile.mkstemp(dir=cache_path.parent, prefix=cache_path.name, suffix=".tmp")
        except OSError as exc:
            log.warning("%s: could not write the index cache (%s)", cache_path, exc)
            return
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f)
            os.replace(tmp, cache_path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            log.warning("%s: could not write the index cache (%s)", cache_path, exc)

    def check_fresh(self, st: os.stat_result | None = None) -> None:
        """Raise :class:`StaleIndexError` if the file's size or mtime differs from the index's.

        Args:
            st: a stat of the file (taken now if omitted).
        """
        st = st if st is not None else os.stat(self.path)
        if st.st_size != self.fingerprint.size or st.st_mtime_ns != self.fingerprint.mtime_ns:
            raise StaleIndexError(
                f"{self.path}: file changed since its offset index was built "
                f"(size {self.fingerprint.size} -> {st.st_size}); recreate the dataset to re-index it"
            )
