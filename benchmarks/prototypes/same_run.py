"""Peers and ours at several chunk sizes, timed in ONE process in interleaved rounds with the floor.

    python benchmarks/prototypes/same_run.py --shape 1,256,4,512,128256 --rounds 7 \
        --impls compile,cce --chunks default,192,224,240,256,320,384,512 [--memory]

Every round times the floor, each peer and ours at each chunk size once, in an order rotated each round
(``benchmarks/timing.py``); each figure is the median over rounds of ``time / floor time of the same
round`` with its min-max. ``--memory`` then measures each one's extra MiB in a fresh process
(``benchmarks/measure.py``), as the loss benchmark does. ``rows`` is the chunk length the loop really uses
(``balanced_chunk_rows`` of the valid rows), which is not always the ``chunk_size`` asked for.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from benchmarks.impls import available, clear_grads, make_case, step  # noqa: E402
from benchmarks.measure import parse_shape, run_fresh  # noqa: E402
from benchmarks.timing import interleaved_rounds, ratio_summary  # noqa: E402
from wmtp_kernels._linear_pass import balanced_chunk_rows, default_chunk_rows  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=parse_shape, default=(1, 256, 4, 512, 128256))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--impls", default="compile,cce", help="peers, comma-separated (empty: none)")
    p.add_argument("--chunks", default="default,256", help="chunk sizes of ours ('default': its own)")
    p.add_argument("--memory", action="store_true", help="extra MiB of each, one fresh process each")
    args = p.parse_args(argv)

    case = make_case(args.shape, torch.float32, "cpu")
    valid = sum(max(args.shape[1] - k, 0) for k in range(1, args.shape[2] + 1)) * args.shape[0]
    runs: dict[str, tuple[str, int | None]] = {"floor": ("floor", None)}
    for impl in filter(None, args.impls.split(",")):
        ok, why = available(impl, "cpu")
        if ok:
            runs[impl] = (impl, None)
        else:
            print(f"skip {impl}: {why}")
    for c in args.chunks.split(","):
        runs["ours" if c == "default" else f"ours@{c}"] = ("ours", None if c == "default" else int(c))
    fns = {name: (lambda i=impl, c=chunk: step(i, case, c)) for name, (impl, chunk) in runs.items()}
    for fn in fns.values():  # warm-up: torch.compile, allocator
        clear_grads(case)
        fn()
    times = interleaved_rounds(fns, args.rounds, "cpu", before_each=lambda: clear_grads(case))

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"shape {args.shape}, {valid} valid rows, {args.rounds} rounds, torch {torch.__version__}")
    print(f"load average after timing (1, 5, 15 min): {load}")
    print("| impl | rows per chunk | × floor (min-max) | median s | extra MiB |")
    print("|---|---|---|---|---|")
    for name, (impl, chunk) in runs.items():
        s = ratio_summary(times[name], times["floor"])
        rows = ""
        if impl == "ours":
            asked = chunk or default_chunk_rows(args.shape[-1], 4, "cpu")
            rows = str(balanced_chunk_rows(valid, asked))
        mib = ""
        if args.memory and impl != "floor":
            mib = f"{run_fresh(impl, [args.shape], 'float32', 'cpu', chunk)[0]['extra_bytes'] / 2**20:.0f}"
        print(
            f"| {name} | {rows} | {s['ratio']:.3f}× ({s['ratio_min']:.2f}-{s['ratio_max']:.2f}) "
            f"| {s['time_s']:.2f} | {mib} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
