import json
import logging
import os

import pytest
import torch

from wmtp_train.data.dataset import LazyJsonlDataset, Sample, collate, tokenize_record
from wmtp_train.data.index import OffsetIndex, StaleIndexError, index_path_for
from wmtp_train.data.records import CodeRecord, RecordError
from wmtp_train.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def rec(i, correct=True, difficulty=1, prompt=None, completion=None):
    return {
        "task_id": f"T/{i % 3}",
        "prompt": prompt if prompt is not None else f"def f{i}():\n",
        "completion": completion if completion is not None else f"    return {i}\n",
        "is_correct": correct,
        "difficulty": difficulty,
    }


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return path


@pytest.fixture
def good_file(tmp_path):
    rows = [rec(i, correct=i % 2 == 0, difficulty=1 + i % 11) for i in range(20)]
    return write_jsonl(tmp_path / "data.jsonl", rows), rows


def test_lazy_dataset_reads_every_record_through_offsets(good_file):
    path, rows = good_file
    ds = LazyJsonlDataset(path, TOK, max_len=64)
    assert len(ds) == len(rows)
    for i in (0, 7, 19, -1):
        expected = CodeRecord(**rows[i])
        assert ds.record(i) == expected
    assert ds.index.is_correct.tolist() == [r["is_correct"] for r in rows]
    assert ds.index.difficulty.tolist() == [r["difficulty"] for r in rows]
    assert [ds.index.task_id(i) for i in range(len(rows))] == [r["task_id"] for r in rows]
    with pytest.raises(IndexError):
        ds.record(20)


def test_field_reads_what_a_code_record_does_not_keep(tmp_path):
    rows = [{**rec(0), "variant": "canonical"}, rec(1), {**rec(2), "variant": "mutant:operator_swap"}]
    ds = LazyJsonlDataset(write_jsonl(tmp_path / "variants.jsonl", rows), TOK, max_len=64)
    assert [ds.field(i, "variant") for i in range(3)] == ["canonical", None, "mutant:operator_swap"]
    assert ds.field(-1, "difficulty") == rows[2]["difficulty"]
    with pytest.raises(IndexError):
        ds.field(3, "variant")


def test_index_is_cached_and_reused(good_file, monkeypatch):
    path, _ = good_file
    LazyJsonlDataset(path, TOK, max_len=64)
    assert index_path_for(path).is_file()

    def no_scan(*args, **kwargs):
        raise AssertionError("index rebuilt although the cache matches the file")

    monkeypatch.setattr(OffsetIndex, "build", classmethod(no_scan))
    assert len(LazyJsonlDataset(path, TOK, max_len=64)) == 20


def test_changed_file_rebuilds_cache_and_is_detected_while_reading(good_file):
    path, rows = good_file
    ds = LazyJsonlDataset(path, TOK, max_len=64)
    with open(path, "a") as f:
        f.write(json.dumps(rec(99, difficulty=5)) + "\n")
    with pytest.raises(StaleIndexError, match="changed"):
        ds[0]
    fresh = LazyJsonlDataset(path, TOK, max_len=64)
    assert len(fresh) == len(rows) + 1
    assert fresh.record(-1).task_id == "T/0" and fresh.record(-1).difficulty == 5


def test_same_size_rewrite_is_detected(good_file):
    path, rows = good_file
    ds = LazyJsonlDataset(path, TOK, max_len=64)
    rows[0]["difficulty"] = 2 if rows[0]["difficulty"] != 2 else 3  # same byte length
    write_jsonl(path, rows)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, ds.index.fingerprint.mtime_ns + 1))
    with pytest.raises(StaleIndexError):
        ds.record(0)
    assert LazyJsonlDataset(path, TOK, max_len=64).record(0).difficulty == rows[0]["difficulty"]


BAD_LINES = [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({k: v for k, v in rec(1).items() if k != "difficulty"}), "missing field"),
    (json.dumps({**rec(1), "prompt": 3}), "'prompt' must be a string"),
    (json.dumps({**rec(1), "completion": ""}), "'completion' is empty"),
    (json.dumps({**rec(1), "task_id": ""}), "'task_id' is empty"),
    (json.dumps({**rec(1), "is_correct": 1}), "'is_correct' must be a boolean"),
    (json.dumps({**rec(1), "difficulty": "3"}), "'difficulty' must be an integer"),
    (json.dumps({**rec(1), "difficulty": True}), "'difficulty' must be an integer"),
    (json.dumps({**rec(1), "difficulty": 12}), r"must be in \[1, 11\]"),
    (json.dumps({**rec(1), "difficulty": 0}), r"must be in \[1, 11\]"),
    (json.dumps(rec(1, completion="x" * 5000)), "over max_record_bytes"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_bad_line_raises_with_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [rec(0), rec(1), line, rec(3)])
    with pytest.raises(RecordError, match=message) as info:
        LazyJsonlDataset(path, TOK, max_len=64, max_record_bytes=4096)
    assert f"{path}:3:" in str(info.value)


def test_skip_policy_drops_bad_lines_and_logs_count(tmp_path, caplog):
    lines = [rec(0)] + [line for line, _ in BAD_LINES] + ["", rec(2, correct=False)]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level(logging.WARNING):
        ds = LazyJsonlDataset(path, TOK, max_len=64, on_error="skip", max_record_bytes=4096)
    assert len(ds) == 2
    assert ds.index.n_skipped == len(BAD_LINES)
    assert f"skipped {len(BAD_LINES)} invalid" in caplog.text
    assert ds.index.line_numbers.tolist() == [1, len(lines)]
    assert [ds.record(i).is_correct for i in range(2)] == [True, False]
    assert [ds.field(i, "task_id") for i in range(2)] == ["T/0", "T/2"]  # the kept lines, not 0 and 1
    # The cache remembers the skipped lines: a strict reader still refuses the file.
    with pytest.raises(RecordError, match=":2:"):
        LazyJsonlDataset(path, TOK, max_len=64, on_error="raise", max_record_bytes=4096)
    with pytest.raises(ValueError, match="on_error"):
        LazyJsonlDataset(path, TOK, max_len=64, on_error="ignore")


def test_tokenization_masks_prompt_and_trains_completion():
    record = CodeRecord("T/1", "ab", "cde", is_correct=False, difficulty=4)
    sample = tokenize_record(record, TOK, max_len=32)
    assert sample.input_ids == [TOK.bos_id, *b"ab", *b"cde", TOK.eos_id]
    assert sample.n_context == 3 and not sample.truncated
    assert (sample.reward, sample.difficulty, sample.task_id) == (0.0, 4, "T/1")


@pytest.mark.parametrize(
    ("n_prompt", "n_completion", "max_len"), [(100, 5, 16), (5, 100, 16), (100, 100, 16), (50, 50, 4)]
)
def test_truncation_keeps_prompt_tail_and_completion_head(n_prompt, n_completion, max_len):
    prompt = "".join(chr(ord("a") + i % 26) for i in range(n_prompt))
    completion = "".join(chr(ord("A") + i % 26) for i in range(n_completion))
    sample = tokenize_record(CodeRecord("T", prompt, completion, True, 1), TOK, max_len)
    ids = sample.input_ids
    assert len(ids) == max_len and sample.truncated and ids[0] == TOK.bos_id
    kept_prompt, kept_completion = ids[1 : sample.n_context], ids[sample.n_context :]
    assert len(kept_completion) >= 1
    assert bytes(kept_prompt) == prompt.encode()[len(prompt) - len(kept_prompt) :]
    full_completion = list(completion.encode()) + [TOK.eos_id]
    assert kept_completion == full_completion[: len(kept_completion)]
    assert len(kept_completion) >= min(len(full_completion), (max_len - 1) // 2)
    with pytest.raises(ValueError, match="max_len"):
        tokenize_record(CodeRecord("T", prompt, completion, True, 1), TOK, 3)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_both_padding_sides(padding_side):
    samples = [
        tokenize_record(CodeRecord("A", "pp", "c", True, 2), TOK, 32),
        tokenize_record(CodeRecord("B", "p", "cccc", False, 9), TOK, 32),
    ]
    batch = collate(samples, TOK.pad_id, padding_side=padding_side, ignore_index=-100)
    assert batch["input_ids"].shape == (2, 7) and batch["input_ids"].dtype == torch.int64
    for key in ("attention_mask", "labels", "loss_mask"):
        assert batch[key].shape == (2, 7) and batch[key].dtype == torch.int64
    assert batch["rewards"].tolist() == [1.0, 0.0] and batch["rewards"].dtype == torch.float32
    assert batch["difficulty"].tolist() == [2, 9] and batch["task_ids"] == ["A", "B"]
    for row, sample in enumerate(samples):
        ids, mask = batch["input_ids"][row], batch["attention_mask"][row]
        real = mask.nonzero().flatten().tolist()
        assert len(real) == len(sample.input_ids)
        assert real == list(range(real[0], real[0] + len(real)))  # contiguous
        assert (real[0] == 0) if padding_side == "right" else (real[-1] == 6)
        assert ids[real].tolist() == sample.input_ids
        assert (ids[mask == 0] == TOK.pad_id).all()
        trained = batch["loss_mask"][row].nonzero().flatten().tolist()
        assert trained == real[sample.n_context :]
        labels = batch["labels"][row]
        assert labels[trained].tolist() == ids[trained].tolist()
        assert (labels[batch["loss_mask"][row] == 0] == -100).all()


def test_collate_rejects_bad_input():
    good = tokenize_record(CodeRecord("A", "p", "c", True, 1), TOK, 8)
    with pytest.raises(ValueError, match="padding_side"):
        collate([good], TOK.pad_id, padding_side="middle")
    with pytest.raises(ValueError, match="empty"):
        collate([], TOK.pad_id)
    with pytest.raises(TypeError, match=r"batch\[1\]"):
        collate([good, {"input_ids": [1]}], TOK.pad_id)
    no_target = Sample(input_ids=[1, 2], n_context=2, reward=1.0, difficulty=1, task_id="X")
    with pytest.raises(ValueError, match="no trained token"):
        collate([good, no_target], TOK.pad_id)


def test_dataloader_with_workers_reads_through_pread(good_file):
    path, rows = good_file
    ds = LazyJsonlDataset(path, TOK, max_len=64)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, collate_fn=lambda b: collate(b, TOK.pad_id)
    )
    rewards = torch.cat([batch["rewards"] for batch in loader])
    assert rewards.tolist() == [1.0 if r["is_correct"] else 0.0 for r in rows]
