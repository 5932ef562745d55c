"""CPU attention in bf16 against fp32: why the model's attention runs in fp32 on the CPU.

``F.scaled_dot_product_attention`` (causal, forward + backward) on bf16 inputs, once with the bf16 kernel
and once with the inputs cast to fp32 and the output cast back (what ``wmtp_train.model.layers.Attention``
does on the CPU), at the micro preset's head shape and the sequence lengths a training batch takes. One
process, interleaved rounds; prints the median milliseconds of each and the median per-round ratio.

    python benchmarks/bench_attention_cpu.py [--batch 16] [--heads 4] [--head-dim 32] [--seqs 64,128,214,384]
        [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def bf16_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def fp32_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(q.dtype)


def seconds(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """One forward + backward."""
    begin = time.perf_counter()
    fn(q, k, v).sum().backward()
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--seqs", default="64,128,214,384", help="comma-separated sequence lengths")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| T | bf16 kernel ms | fp32 kernel ms | bf16 / fp32 (median of {args.rounds} rounds, range) |")
    print("|---:|---:|---:|---|")
    for seq in (int(s) for s in args.seqs.split(",")):
        shape = (args.batch, args.heads, seq, args.head_dim)
        q, k, v = (torch.randn(shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        for fn in (bf16_kernel, fp32_kernel):
            seconds(fn, q, k, v)
        times: dict = {bf16_kernel: [], fp32_kernel: []}
        for _ in range(args.rounds):
            for fn in times:
                times[fn].append(seconds(fn, q, k, v))
        ratios = [a / b for a, b in zip(times[bf16_kernel], times[fp32_kernel])]
        print(
            f"| {seq} | {statistics.median(times[bf16_kernel]) * 1e3:.1f} | "
            f"{statistics.median(times[fp32_kernel]) * 1e3:.1f} | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) |"
        )


if __name__ == "__main__":
    main()
