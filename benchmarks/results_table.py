"""Write the benchmark results as markdown tables (``benchmarks/RESULTS.md``)."""

from __future__ import annotations

import datetime
import platform

import torch

MIB = 2**20


def environment() -> dict[str, str]:
    """Device name and library versions for the header of the results."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            device = f"{model}, {torch.get_num_threads()} threads"
        except (OSError, StopIteration):
            pass
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _shape(shape) -> str:
    return ", ".join(str(x) for x in shape)


def render(results: list[dict], sweep: list[dict], note: str = "") -> str:
    """Markdown: one row per (shape, implementation) with time, ratio to the floor and extra memory."""
    env = environment()
    lines = [
        "# Loss benchmark: weighted MTP loss, forward + backward, H = 4",
        "",
        f"Device: {env['device']} · torch {env['torch']} · triton {env['triton']} · {env['date']}",
        "",
        "Time: best of 3 after a warm-up, each implementation in a fresh process. Ratio: to the 3-GEMM floor",
        "(logits = X W^T, dX = G W, dW = G^T X over all rows, timed in the same run). Extra memory: peak",
        "beyond inputs and gradients (CPU: peak RSS of the process during one step minus RSS before it,",
        "minus the gradients' bytes; CUDA: max_memory_allocated).",
        "",
    ]
    if note:
        lines += [note, ""]
    lines += [
        "| shape B, T, H, d, V | dtype | implementation | time | × floor | extra memory | × naive memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        floor = next(
            (x for x in results if x["shape"] == r["shape"] and x["impl"] == "floor" and "time_s" in x), None
        )
        naive = next(
            (x for x in results if x["shape"] == r["shape"] and x["impl"] == "naive" and "time_s" in x), None
        )
        if "skipped" in r:
            lines.append(
                f"| {_shape(r['shape'])} | {r['dtype']} | {r['impl']} | skipped: {r['skipped']} | | | |"
            )
            continue
        ratio = f"{r['time_s'] / floor['time_s']:.3f}×" if floor else "-"
        mem = "-" if r["impl"] == "floor" else f"{r['extra_bytes'] / MIB:.0f} MiB"
        rel = (
            f"{r['extra_bytes'] / naive['extra_bytes'] * 100:.1f} %"
            if naive and r["impl"] != "floor" and naive["extra_bytes"] > 0
            else "-"
        )
        time_ms = f"{r['time_s'] * 1e3:.0f} ms"
        lines.append(
            f"| {_shape(r['shape'])} | {r['dtype']} | {r['impl']} | {time_ms} | {ratio} | {mem} | {rel} |"
        )
    if sweep:
        lines += [
            "",
            "## Chunk-size curve (ours)",
            "",
            "| shape B, T, H, d, V | chunk rows | time | × floor | extra memory |",
            "|---|---|---|---|---|",
        ]
        for r in sweep:
            floor = next((x for x in results if x["shape"] == r["shape"] and x["impl"] == "floor"), None)
            ratio = f"{r['time_s'] / floor['time_s']:.3f}×" if floor and "time_s" in floor else "-"
            lines.append(
                f"| {_shape(r['shape'])} | {r['chunk']} | {r['time_s'] * 1e3:.0f} ms | {ratio} | "
                f"{r['extra_bytes'] / MIB:.0f} MiB |"
            )
    return "\n".join(lines) + "\n"
