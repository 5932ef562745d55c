"""Write the register / spill table of every Triton kernel (sm_80, sm_90) into benchmarks/KERNEL_NOTES.md.

Usage: ``python benchmarks/aot_report.py`` (no GPU needed). The table replaces the text between the
``aot-table`` markers of KERNEL_NOTES.md; the rest of the file is hand-written.
"""

import os

# Kernels decorated under the interpreter cannot be compiled; this must precede importing triton.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import triton  # noqa: E402

from wmtp_kernels._aot import compile_all  # noqa: E402

NOTES = Path(__file__).with_name("KERNEL_NOTES.md")
START, END = "<!-- aot-table:start -->", "<!-- aot-table:end -->"


def render_table() -> str:
    reports = compile_all()
    lines = [
        f"Triton {triton.__version__}, `triton.compile(ASTSource(...), target=GPUTarget('cuda', arch, 32))`; "
        "registers per thread and local memory per thread (spills + stack) from "
        "`cuobjdump --dump-resource-usage` of the cubin. Regenerate with `python benchmarks/aot_report.py`.",
        "",
        "| kernel | specialisation | target | regs | spill (local bytes) | cubin bytes |",
        "|---|---|---|---|---|---|",
    ]
    for r in reports:
        cells = [f"`{r.kernel}`", r.specialisation, f"sm_{r.arch}", r.registers, r.local_bytes, r.cubin_bytes]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    text = NOTES.read_text()
    if START not in text or END not in text:
        print(f"{NOTES} lacks the {START} / {END} markers", file=sys.stderr)
        return 1
    block = f"{START}\n{render_table()}\n{END}"
    NOTES.write_text(re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S))
    print(f"wrote the table into {NOTES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
