"""pytest plugin of the benchmarks: ``bench_*.py`` collection, options, the summary and the results files.

    pytest benchmarks --benchmark-only [--bench-rounds 5] [--bench-curve] [--bench-shapes small]
                                       [--update-results [--results-dir DIR]]

Nothing is written unless ``--update-results`` is given: then ``RESULTS.md`` (the part between its
``results`` markers), ``results-cpu.json`` and ``frontier.png`` in ``--results-dir`` (default
``benchmarks/``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from benchmarks.impls import IMPLS
from benchmarks.results_table import environment, header, render_curve, render_table, with_floor_rows

HERE = Path(__file__).parent
ROWS: list[dict] = []
CURVE: list[dict] = []
START, END = "<!-- results:start -->", "<!-- results:end -->"


def pytest_addoption(parser):
    group = parser.getgroup("wmtp benchmarks")
    group.addoption("--bench-rounds", type=int, default=5, help="timed rounds per implementation (default 5)")
    group.addoption(
        "--bench-curve",
        action="store_true",
        help="also the chunk-size curve of ours (implied by --update-results)",
    )
    group.addoption(
        "--bench-shapes", choices=["cpu", "small"], default="cpu", help="small: a smoke-test shape"
    )
    group.addoption(
        "--update-results", action="store_true", help="write RESULTS.md, results-cpu.json and frontier.png"
    )
    group.addoption("--results-dir", type=Path, default=HERE, help="where --update-results writes")


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def record():
    """``record(row, curve=False)`` adds a result row to the summary (and to the results files)."""

    def add(row: dict, curve: bool = False) -> None:
        (CURVE if curve else ROWS).append(row)

    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not ROWS and not CURVE:
        return
    terminalreporter.section("weighted MTP loss: ratio to the floor, extra memory")
    if ROWS:
        terminalreporter.write_line(render_table(with_floor_rows(ROWS, IMPLS)))
    if CURVE:
        terminalreporter.write_line("")
        terminalreporter.write_line(render_curve(CURVE))
    if config.getoption("--update-results"):
        written = write_results(config.getoption("--results-dir"), config.getoption("--bench-rounds"))
        terminalreporter.write_line(f"wrote {', '.join(str(p) for p in written)}")


def write_results(directory: Path, rounds: int) -> list[Path]:
    """RESULTS.md (between the markers, or a new file), results-cpu.json and frontier.png."""
    from benchmarks.frontier import plot_frontier

    directory.mkdir(parents=True, exist_ok=True)
    env = environment("cpu")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"Measured with `pytest benchmarks --benchmark-only --update-results --bench-rounds {rounds}`.",
        "",
        header(env) + f" · load average at the end: {load}",
        "",
        render_table(with_floor_rows(ROWS, IMPLS)),
        "",
    ]
    if CURVE:
        lines += ["Chunk-size curve of ours (`chunk_size=`):", "", render_curve(CURVE), ""]
    lines += ["![time against memory](frontier.png)"]
    block = f"{START}\n" + "\n".join(lines) + f"\n{END}"
    results_md = directory / "RESULTS.md"
    text = results_md.read_text() if results_md.exists() else f"# Loss benchmark results\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    results_md.write_text(
        re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    )
    raw = directory / "results-cpu.json"
    raw.write_text(json.dumps({"environment": env, "rows": ROWS, "curve": CURVE}, indent=1))
    png = plot_frontier(ROWS, CURVE, directory / "frontier.png")
    return [results_md, raw, png]
