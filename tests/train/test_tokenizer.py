import pytest

from wmtp_train.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer


def test_byte_tokenizer_ids_and_specials():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (260, 256, 257, 258)
    text = "def f(x):\n    return 'é✓'\n"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:-1] == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids[1:-1])
    assert tok.decode(ids) == text


def test_byte_tokenizer_decode_skips_specials_and_replaces_invalid_utf8():
    tok = ByteTokenizer()
    assert tok.decode([tok.bos_id, ord("a"), tok.pad_id, ord("b"), tok.eos_id, 259]) == "ab"
    assert tok.decode([0xC3]) == "\ufffd"  # a truncated 2-byte sequence
    with pytest.raises(ValueError, match="ids"):
        tok.decode([260])
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")


def test_load_tokenizer_falls_back_to_bytes(tmp_path):
    assert isinstance(load_tokenizer(), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_sentencepiece_tokenizer_beside_checkpoint(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"def f{i}(x): return x + {i} # line {i}" for i in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=64,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_id=0,
    )
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 64 and tok.pad_id == tok.eos_id == 2 and tok.bos_id == 1
    ids = tok.encode("def f7(x): return x + 7", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and all(0 <= i < 64 for i in ids)
    assert tok.decode(ids) == "def f7(x): return x + 7"
