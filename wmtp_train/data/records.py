"""The JSONL record format and its strict validation.

One record per line: ``{"task_id": str, "prompt": str, "completion": str, "is_correct": bool,
"difficulty": int in 1..11}``. For code, ``prompt + completion`` is the program the tests run against
(the HumanEval convention). Unknown keys are allowed and ignored (builders keep provenance there, such
as ``variant``).

Bad lines follow an error policy: ``"raise"`` raises a :class:`RecordError` naming ``file:line``,
``"skip"`` drops the line and counts it (the count is logged once per file scan).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

ErrorPolicy = Literal["raise", "skip"]
ERROR_POLICIES = ("raise", "skip")
MIN_DIFFICULTY = 1
MAX_DIFFICULTY = 11
DEFAULT_MAX_RECORD_BYTES = 1 << 20


class RecordError(ValueError):
    """A JSONL line that is not a valid record; the message starts with ``file:line``."""


@dataclass(frozen=True)
class CodeRecord:
    """One verified code sample.

    Attributes:
        task_id: the problem it solves (several records share a task_id).
        prompt: the text given to the model (masked out of the loss).
        completion: the text the model is trained on; non-empty.
        is_correct: whether ``prompt + completion`` passed the problem's tests.
        difficulty: 1 (easiest) .. 11 (hardest).
    """

    task_id: str
    prompt: str
    completion: str
    is_correct: bool
    difficulty: int

    def to_json(self) -> str:
        """The record as one JSON line (without the newline)."""
        return json.dumps(asdict(self), ensure_ascii=False)


_STR_FIELDS = ("task_id", "prompt", "completion")


def validate_error_policy(on_error: str) -> ErrorPolicy:
    """Check an ``on_error`` argument.

    Args:
        on_error: ``"raise"`` or ``"skip"``.

    Returns:
        The same value.
    """
    if on_error not in ERROR_POLICIES:
        raise ValueError(f"on_error must be one of {ERROR_POLICIES}, got {on_error!r}")
    return on_error  # type: ignore[return-value]


def record_from_dict(obj: object, where: str = "<record>") -> CodeRecord:
    """Validate a decoded JSON object and build the record.

    Args:
        obj: the decoded JSON value.
        where: location used in error messages (``file:line``).

    Returns:
        The validated record.
    """
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in (*_STR_FIELDS, "is_correct", "difficulty") if key not in obj]
    if missing:
        raise RecordError(f"{where}: missing field(s) {missing}")
    for key in _STR_FIELDS:
        if not isinstance(obj[key], str):
            raise RecordError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["task_id"]:
        raise RecordError(f"{where}: field 'task_id' is empty")
    if not obj["completion"]:
        raise RecordError(f"{where}: field 'completion' is empty")
    if not isinstance(obj["is_correct"], bool):
        raise RecordError(
            f"{where}: field 'is_correct' must be a boolean, got {type(obj['is_correct']).__name__}"
        )
    difficulty = obj["difficulty"]
    # bool is an int subclass: reject it explicitly.
    if not isinstance(difficulty, int) or isinstance(difficulty, bool):
        raise RecordError(f"{where}: field 'difficulty' must be an integer, got {type(difficulty).__name__}")
    if not MIN_DIFFICULTY <= difficulty <= MAX_DIFFICULTY:
        raise RecordError(
            f"{where}: field 'difficulty' must be in [{MIN_DIFFICULTY}, {MAX_DIFFICULTY}], got {difficulty}"
        )
    return CodeRecord(
        task_id=obj["task_id"],
        prompt=obj["prompt"],
        completion=obj["completion"],
        is_correct=obj["is_correct"],
        difficulty=difficulty,
    )


def parse_record_line(
    line: bytes, where: str = "<record>", max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> CodeRecord:
    """Parse one raw JSONL line.

    Args:
        line: the raw bytes of the line (trailing newline allowed).
        where: location used in error messages (``file:line``).
        max_record_bytes: lines longer than this are rejected as over-long.

    Returns:
        The validated record.
    """
    if len(line) > max_record_bytes:
        raise RecordError(f"{where}: record is {len(line)} bytes, over max_record_bytes={max_record_bytes}")
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{where}: malformed JSON ({exc})") from None
    return record_from_dict(obj, where)
