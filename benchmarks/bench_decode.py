"""Self-speculative decoding with the MTP heads vs plain greedy decoding (both with the KV cache).

Script: ``python benchmarks/bench_decode.py [--checkpoint RUN_OR_EXPORT_DIR] [--prompts 8]
[--max-new-tokens 128] [--batch-size 1] [--repeats 3]`` prints one markdown row per configuration:
tokens per forward, draft acceptance, best-of-N wall time of each, speed-up, and whether the outputs
are identical (they must be). Without ``--checkpoint`` the ``micro`` preset with random weights is used:
its extra heads draft noise, so that row shows the overhead of verification, not a gain.

Prompts are the first HumanEval prompts (bos + prompt, Codex stop sequences, eos stops).

CPU timings use one torch thread by default (``--threads``): a model this small is dominated by
per-op overhead, and more threads only add contention on a shared machine.

``pytest benchmarks/bench_decode.py --benchmark-only`` runs the random-weight micro row
(``WMTP_DECODE_CHECKPOINT`` adds a trained one).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import pytest
import torch

from wmtp_train.data.tokenizer import ByteTokenizer
from wmtp_train.eval.humaneval import CODEX_STOP_SEQUENCES, humaneval_problems
from wmtp_train.eval.loading import load_for_evaluation
from wmtp_train.inference.generation import DecodeStats, GenerationConfig, encode_prompts, generate_ids
from wmtp_train.inference.speculative import speculative_generate_ids
from wmtp_train.model import build_model


def _timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure(model, tokenizer, n_prompts: int, max_new_tokens: int, batch_size: int, repeats: int) -> dict:
    """Decode the first HumanEval prompts both ways and compare.

    Returns:
        A result row (dict).
    """
    prompts = encode_prompts(tokenizer, [p["prompt"] for p in humaneval_problems(n_prompts)])
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_id,), stop_sequences=CODEX_STOP_SEQUENCES
    )
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]

    def run(decode):
        stats = DecodeStats()
        out = [
            g
            for batch in batches
            for g in decode(model, batch, config, tokenizer.pad_id, tokenizer.decode, stats)
        ]
        return out, stats

    plain_s, (plain, plain_stats) = _timed(lambda: run(generate_ids), repeats)
    spec_s, (spec, spec_stats) = _timed(lambda: run(speculative_generate_ids), repeats)
    device, args = model.tok_embeddings.weight.device, model.args
    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": f"d{args.dim} L{args.n_layers} H{args.n_future_tokens} V{args.vocab_size}",
        "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
        "prompts": len(prompts),
        "batch": batch_size,
        "tokens": spec_stats.generated_tokens,
        "tokens_per_forward": spec_stats.tokens_per_forward,
        "acceptance": spec_stats.acceptance_rate,
        "plain_s": plain_s,
        "speculative_s": spec_s,
        "speedup": plain_s / spec_s,
        "plain_tokens_per_s": plain_stats.generated_tokens / plain_s,
        "identical": [g.tokens for g in plain] == [g.tokens for g in spec],
    }


def markdown_rows(label: str, row: dict, header: bool) -> str:
    """Format a result row (with the header when asked)."""
    keys = ["model", "dtype", "device", "batch", "tokens", "tokens_per_forward", "acceptance", "plain_s",
            "speculative_s", "speedup", "identical", "torch", "date"]  # fmt: skip
    lines = []
    if header:
        lines += ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    cells = [f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _models(checkpoints: list[str], device: str):
    if not checkpoints:
        torch.manual_seed(0)
        yield "micro (random weights)", build_model("micro", device=device).eval(), ByteTokenizer()
    for path in checkpoints:
        model, tokenizer, directory = load_for_evaluation(path, device=device)
        yield str(path), model, tokenizer


_TRAINED = os.environ.get("WMTP_DECODE_CHECKPOINT")


@pytest.mark.parametrize("checkpoint", [None, *([_TRAINED] if _TRAINED else [])])
def test_speculative_decode(benchmark, checkpoint):
    label, model, tokenizer = next(_models([checkpoint] if checkpoint else [], "cpu"))
    row = benchmark.pedantic(measure, args=(model, tokenizer, 4, 64, 1, 1), rounds=1, iterations=1)
    benchmark.extra_info.update(row)
    print("\n" + markdown_rows(label, row, header=True))
    assert row["identical"]


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", action="append", default=[], help="run or export dir (repeatable)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for i, (label, model, tokenizer) in enumerate(_models(args.checkpoint, args.device)):
        row = measure(model, tokenizer, args.prompts, args.max_new_tokens, args.batch_size, args.repeats)
        print(markdown_rows(label, row, header=i == 0), flush=True)


if __name__ == "__main__":
    main()
