"""Tokenizers for the trainer: a byte-level one for the micro model, sentencepiece for Meta checkpoints.

Both expose the same small interface: ``encode(text, bos=False, eos=False) -> list[int]``,
``decode(ids) -> str`` (special ids skipped, invalid UTF-8 replaced), ``vocab_size``, ``pad_id``,
``bos_id`` and ``eos_id``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

TOKENIZER_FILENAME = "tokenizer.model"


class Tokenizer(Protocol):
    """The interface the data pipeline and the evaluator rely on."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class _SpecialIds:
    """``encode`` with optional bos / eos around the ids of the text (``_text_ids``)."""

    bos_id: int
    eos_id: int

    def _text_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode a string.

        Args:
            text: the string to encode.
            bos: prepend ``bos_id``.
            eos: append ``eos_id``.

        Returns:
            The token ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return [self.bos_id] * bos + self._text_ids(text) + [self.eos_id] * eos


class ByteTokenizer(_SpecialIds):
    """UTF-8 bytes as tokens 0..255, then pad=256, bos=257, eos=258 and one reserved id 259.

    ``vocab_size`` is 260, the vocabulary of the ``micro`` model preset.
    """

    vocab_size = 260
    pad_id = 256
    bos_id = 257
    eos_id = 258
    reserved_id = 259

    def _text_ids(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Decode token ids back to text.

        Args:
            ids: token ids in ``[0, vocab_size)``; the special ids (>= 256) are skipped.

        Returns:
            The decoded string; byte sequences that are not valid UTF-8 become U+FFFD.
        """
        data = bytearray()
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"ids: token id {token} outside [0, {self.vocab_size})")
            if token < 256:
                data.append(token)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer(_SpecialIds):
    """A sentencepiece model file (Meta's ``tokenizer.model``); needs the optional ``sentencepiece``.

    When the model defines no pad piece (Meta's Llama tokenizer has ``pad_id() == -1``), ``pad_id`` is
    ``eos_id``: padding positions are masked out of attention and loss, so any valid id will do.
    """

    def __init__(self, model_path: str | Path):
        """Load a sentencepiece model.

        Args:
            model_path: path of the ``.model`` file.
        """
        try:
            import sentencepiece
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "SentencePieceTokenizer needs the optional 'sentencepiece' package: "
                "pip install 'wmtp[tokenizer]' (or pip install sentencepiece)"
            ) from exc
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"model_path: no sentencepiece model at {model_path}")
        self.model_path = model_path
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = int(self._sp.vocab_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else self.eos_id
        self._special = {i for i in (self.bos_id, self.eos_id, pad) if i >= 0}

    def _text_ids(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Decode token ids back to text, skipping bos/eos/pad.

        Args:
            ids: token ids in ``[0, vocab_size)``.

        Returns:
            The decoded string.
        """
        kept = []
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"ids: token id {token} outside [0, {self.vocab_size})")
            if token not in self._special:
                kept.append(token)
        return self._sp.decode(kept)


def load_tokenizer(checkpoint_dir: str | Path | None = None) -> ByteTokenizer | SentencePieceTokenizer:
    """The tokenizer that goes with a checkpoint.

    Args:
        checkpoint_dir: a checkpoint directory; its ``tokenizer.model`` is used when present.

    Returns:
        A ``SentencePieceTokenizer`` for ``checkpoint_dir/tokenizer.model`` if that file exists,
        otherwise the ``ByteTokenizer``.
    """
    if checkpoint_dir is not None:
        model_path = Path(checkpoint_dir) / TOKENIZER_FILENAME
        if model_path.is_file():
            return SentencePieceTokenizer(model_path)
    return ByteTokenizer()
