"""Markdown of the loss benchmarks: environment header, one row per (shape, implementation), chunk curve.

A result row is a dict with ``impl``, ``shape`` and either ``skipped`` (why) or ``extra_bytes`` and the
:func:`benchmarks.timing.ratio_summary` keys (``time_s``, ``ratio``, ``ratio_min``, ``ratio_max``,
``rounds``), optionally ``loss`` and ``chunk``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import statistics
import subprocess

import torch

MIB = 2**20
PEERS = ("cut-cross-entropy", "liger-kernel", "triton")

TIME_NOTE = (
    "Time: median over rounds of one forward + backward; each round times the implementation and the "
    "3-GEMM floor (logits = X W^T, dX = G W, dW = G^T X over all rows, no loss) back to back in one process, "
    "and × floor is the median of the per-round ratios, with their min-max. Extra memory: peak beyond inputs "
    "and gradients of one step, measured in a fresh process per implementation (CPU: peak RSS minus RSS "
    "before the step, minus the gradients; CUDA: max_memory_allocated minus the allocation before the step, "
    "minus the gradients); × naive: against `naive` (per-head F.linear + float32 F.cross_entropy, autograd)."
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        try:
            return __import__(dist.replace("-", "_")).__version__
        except (ImportError, AttributeError):
            return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def environment(device: str) -> dict[str, str]:
    """Device, driver and library versions for the header of a results file."""
    env = {"python": platform.python_version(), "torch": torch.__version__}
    env.update({dist: _version(dist) for dist in PEERS})
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["device"] = (
            f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
        )
        env["driver"] = _driver()
        env["cuda"] = str(torch.version.cuda)
    else:
        env["device"] = f"{_cpu_model()}, {torch.get_num_threads()} torch threads"
    env["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return env


def header(env: dict[str, str]) -> str:
    return " · ".join(f"{k} {v}" if k not in ("device", "date") else v for k, v in env.items())


def _shape(shape) -> str:
    return ", ".join(str(x) for x in shape)


def _mib(nbytes: float) -> str:
    return f"{nbytes / MIB:,.0f} MiB"


def _ratio(r: dict) -> str:
    return f"{r['ratio']:.3f}× ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 1 else f"{seconds * 1e3:,.0f} ms"


def with_floor_rows(rows: list[dict], order) -> list[dict]:
    """The rows sorted by shape (first seen first), then ``order``, with one ``floor`` row per shape.

    The floor row's time is the median of the floor medians measured alongside each implementation.
    """
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    out = [r for r in rows if r["impl"] != "floor"]
    for shape in shapes:
        floors = sorted(r["floor_s"] for r in out if tuple(r["shape"]) == shape and "floor_s" in r)
        if floors:
            out.append({"impl": "floor", "shape": list(shape), "time_s": statistics.median(floors)})
    return sorted(out, key=lambda r: (shapes.index(tuple(r["shape"])), order.index(r["impl"])))


def render_table(rows: list[dict]) -> str:
    """One row per (shape, implementation) in the given order."""
    lines = [
        "| shape B, T, H, d, V | implementation | time | × floor (min-max) | extra memory | × naive memory "
        "| loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = r["impl"] if r.get("chunk") is None else f"{r['impl']} (chunk {r['chunk']})"
        if "skipped" in r:
            lines.append(f"| {_shape(r['shape'])} | {label} | skipped: {r['skipped']} | | | | |")
            continue
        naive = next(
            (x for x in rows if x["shape"] == r["shape"] and x["impl"] == "naive" and "skipped" not in x),
            None,
        )
        floor = r["impl"] == "floor"
        ratio = "1" if floor else _ratio(r)
        mem = "-" if floor else _mib(r["extra_bytes"])
        comparable = naive and not floor and naive["extra_bytes"] >= MIB
        rel = f"{r['extra_bytes'] / naive['extra_bytes'] * 100:.1f} %" if comparable else "-"
        loss = "-" if r.get("loss") is None else f"{r['loss']:.5f}"
        lines.append(
            f"| {_shape(r['shape'])} | {label} | {_ms(r['time_s'])} | {ratio} | {mem} | {rel} | {loss} |"
        )
    return "\n".join(lines)


def render_curve(rows: list[dict]) -> str:
    """The chunk-size curve of ours: rows per chunk, × floor, extra memory."""
    lines = [
        "| shape B, T, H, d, V | chunk rows | time | × floor (min-max) | extra memory |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {_shape(r['shape'])} | {r['chunk']} | {_ms(r['time_s'])} | {_ratio(r)} | "
            f"{_mib(r['extra_bytes'])} |"
        )
    return "\n".join(lines)


def render(title: str, env: dict[str, str], rows: list[dict], curve: list[dict], note: str = "") -> str:
    """A whole results document."""
    parts = [f"# {title}", "", header(env), "", TIME_NOTE, ""]
    if note:
        parts += [note, ""]
    parts += [render_table(rows), ""]
    if curve:
        parts += ["## Chunk-size curve (ours)", "", render_curve(curve), ""]
    return "\n".join(parts)
