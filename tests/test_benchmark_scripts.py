"""The benchmark scripts on the CPU: argument handling of the GPU check, the pipelines on tiny shapes.

The GPU check itself needs a CUDA device; here its dry run, its refusals of bad arguments and its
one-line skip without CUDA are checked, and ``gpu_bench.py`` runs its whole pipeline with ``--device cpu``.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.frontier import pareto
from benchmarks.impls import TD_BETA, loss_of, make_case
from benchmarks.results_table import render_table, with_floor_rows
from benchmarks.timing import interleaved_rounds, ratio_summary
from wmtp_kernels.reference import weighted_mtp_loss_from_hidden

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def gpu_check(*args):
    return subprocess.run(
        ["bash", str(GPU_CHECK), *args], capture_output=True, text=True, env=ENV, timeout=120
    )


def test_gpu_check_dry_run_prints_the_plan(tmp_path):
    out = gpu_check("--dry-run", "--out", str(tmp_path / "o"), "--budget", "400", "--wheels", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert f"out={tmp_path / 'o'} budget=400s" in out.stdout
    assert f"none in {tmp_path}" in out.stdout
    assert "tests/kernels/test_cuda_parity.py" in out.stdout  # found by its gpu marker
    assert "benchmarks/gpu_7b_step.py" in out.stdout
    assert "benchmarks/gpu_bench.py --out" in out.stdout
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget"], "--budget needs a value"),
        (["--budget", "8m"], "--budget must be a positive number of seconds"),
        (["--tests-limit", "0"], "--tests-limit must be a positive number of seconds"),
        (["--out", "--dry-run"], "--out needs a value"),
        (["--budget", "100", "--tests-limit", "100"], "leaves nothing of --budget"),
        (["--budget", "200", "--tests-limit", "100", "--step-limit", "100"], "(200 s) leaves nothing"),
        (["--step-limit", "x"], "--step-limit must be a positive number of seconds"),
        (["--gpu"], "unknown argument '--gpu'"),
    ],
)
def test_gpu_check_refuses_bad_arguments(args, message):
    out = gpu_check(*args, "--dry-run")
    assert out.returncode == 2
    assert message in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpu_check_without_cuda_skips_in_one_line(tmp_path):
    out = gpu_check("--out", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and "skipped" in out.stdout and "CUDA" in out.stdout
    assert not (tmp_path / "o").exists()


def test_gpu_bench_refuses_unknown_impls(tmp_path):
    cmd = [sys.executable, "benchmarks/gpu_bench.py", "--out", str(tmp_path), "--impls", "ours,flce"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "--impls: unknown ['flce']" in out.stderr


@pytest.mark.slow
def test_gpu_bench_pipeline_on_cpu(tmp_path):
    cmd = [sys.executable, "benchmarks/gpu_bench.py", "--out", str(tmp_path), "--device", "cpu",
           "--dtype", "float32", "--shape", "1,8,4,16,300", "--impls", "ours,liger,naive", "--rounds", "2",
           "--note", "tests: a note"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = {r["impl"]: r for r in json.loads((tmp_path / "results-cuda.json").read_text())["rows"]}
    assert set(rows) == {"floor", "naive", "liger", "ours"}
    assert rows["liger"]["skipped"] == "Liger-Kernel needs CUDA"
    assert rows["ours"]["loss"] == pytest.approx(rows["naive"]["loss"], rel=1e-5)
    assert rows["ours"]["rounds"] == 2 and rows["ours"]["ratio_min"] <= rows["ours"]["ratio"]
    text = (tmp_path / "RESULTS-cuda.md").read_text()
    assert "tests: a note" in text and "| 1, 8, 4, 16, 300 | ours |" in text


def test_interleaved_rounds_rotate_and_ratio_summary():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = interleaved_rounds(fns, 3, "cpu", before_each=lambda: calls.append("-"))
    assert [c for c in calls if c != "-"] == list("abcbcacab")
    assert calls.count("-") == 9 and all(len(t) == 3 for t in times.values())
    summary = ratio_summary([2.0, 3.0, 10.0], [1.0, 2.0, 4.0])
    assert summary["ratio"] == 2.0 and summary["ratio_min"] == 1.5 and summary["ratio_max"] == 2.5
    assert summary["time_s"] == 3.0 and summary["floor_s"] == 2.0
    with pytest.raises(ValueError, match="one floor time per round"):
        ratio_summary([1.0], [1.0, 2.0])


def test_floor_rows_and_table():
    timed = {"ratio": 1.2, "ratio_min": 1.1, "ratio_max": 1.3, "time_s": 0.012}
    rows = [
        {"impl": "ours", "shape": [1, 2, 3, 4, 5], "extra_bytes": 2**21, "floor_s": 0.01, **timed},
        {"impl": "naive", "shape": [1, 2, 3, 4, 5], "extra_bytes": 2**23, "floor_s": 0.03, **timed},
        {"impl": "liger", "shape": [1, 2, 3, 4, 5], "skipped": "Liger-Kernel needs CUDA"},
    ]
    ordered = with_floor_rows(rows, ("floor", "naive", "liger", "ours"))
    assert [r["impl"] for r in ordered] == ["floor", "naive", "liger", "ours"]
    assert ordered[0]["time_s"] == pytest.approx(0.02)
    table = render_table(ordered)
    assert "| 1, 2, 3, 4, 5 | ours | 12.0 ms | 1.200× (1.10-1.30) | 2 MiB | 25.0 % | - |" in table
    assert "skipped: Liger-Kernel needs CUDA" in table


def test_pareto_keeps_only_undominated_points():
    points = [(10, 1.0, "a"), (5, 1.5, "b"), (20, 1.2, "c"), (1, 3.0, "d"), (6, 1.5, "e")]
    assert [p[2] for p in pareto(points)] == ["d", "b", "a"]


def test_every_benchmark_module_imports():
    """What a user runs first, ``pytest benchmarks --benchmark-only``, collects every ``bench_*.py``: one
    broken import there stops the whole run (as a stale helper name in ``bench_compile.py`` once did).

    Run as the bare ``pytest`` command is: ``-P`` keeps the working directory off ``sys.path`` (``python -m``
    would add it) and no ``PYTHONPATH``, so the repository root must come from pytest's own configuration.
    """
    collect = [sys.executable, "-P", "-m", "pytest", "benchmarks", "--collect-only", "-q"]
    collect += ["-p", "no:cacheprovider"]
    bare_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(collect, capture_output=True, text=True, env=bare_env, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and "ERROR" not in result.stdout, result.stdout[-3000:]


@pytest.mark.slow
def test_pytest_benchmark_writes_results_only_when_asked(tmp_path):
    base = [sys.executable, "-m", "pytest", "benchmarks/bench_loss.py", "--benchmark-only", "-q",
            "-p", "no:cacheprovider", "--bench-shapes", "small", "--bench-rounds", "2",
            "-k", "test_loss and ours-td"]  # fmt: skip
    tracked = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    plain = subprocess.run(base, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert plain.returncode == 0, plain.stdout[-3000:]
    assert "ratio to the floor, extra memory" in plain.stdout and "| ours-td |" in plain.stdout
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == tracked
    update = base + ["--update-results", "--results-dir", str(tmp_path)]
    written = subprocess.run(update, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert written.returncode == 0, written.stdout[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == {"RESULTS.md", "results-cpu.json", "frontier.png"}
    assert "| 1, 64, 4, 128, 8000 | ours-td |" in (tmp_path / "RESULTS.md").read_text()
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == tracked


@pytest.mark.parametrize(
    "args, message",
    [
        (["--impls", "fused,flash"], "--impls must name some of"),
        (["--steps", "2", "--warmup", "2"], "--steps (2) must exceed --warmup (2)"),
    ],
)
def test_bench_train_refuses_bad_arguments(args, message):
    cmd = [sys.executable, "benchmarks/bench_train.py", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and message in out.stderr


@pytest.mark.parametrize(
    "impl", ["naive", "ours", "ours-td", pytest.param("cce", marks=pytest.mark.slow), "liger"]
)
def test_every_implementation_computes_the_reference_loss(impl):
    """The peers get precomputed row targets and factors: they must compute the same loss and gradients."""
    if impl == "cce":
        pytest.importorskip("cut_cross_entropy")
    if impl == "liger":
        pytest.importorskip("liger_kernel")
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            pytest.skip("Liger-Kernel's Triton kernels need CUDA or TRITON_INTERPRET=1")
    case = make_case((2, 7, 4, 8, 50), torch.float32, "cpu")
    hidden, weight = case["hidden"], case["weight"]
    source = {"values": case["values"], "rewards": case["rewards"], "beta": TD_BETA}
    truth = weighted_mtp_loss_from_hidden(hidden, weight, case["labels"], **source)
    truth_grads = torch.autograd.grad(truth, [hidden, weight])
    got = loss_of(impl, case)
    grads = torch.autograd.grad(got, [hidden, weight])
    torch.testing.assert_close(got, truth, rtol=1e-5, atol=1e-6)
    for g, t in zip(grads, truth_grads):
        torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-6)


def test_critic_hazard_head_carries_a_wrong_token_to_every_later_token():
    from benchmarks.prototypes.critic_heads import CachedHead
    from wmtp_train.model import PRESETS, ValueHead

    args = PRESETS["micro"]
    plain_head = ValueHead(args)
    plain_head.init_weights()
    hazard_head = ValueHead(dataclasses.replace(args, value_head="hazard"))
    hazard_head.init_weights()
    hazard_head.load_state_dict(plain_head.state_dict(), strict=False)
    logits = torch.full((1, 6, 1), -30.0)
    logits[0, 2] = 10.0  # token 2 looks wrong
    hazard_head.hazard_proj = torch.nn.Module()
    hazard_head.hazard_proj.forward = lambda x: logits
    head = CachedHead(hazard_head)
    hidden, ids = torch.randn(1, 6, args.dim), torch.zeros(1, 6, dtype=torch.long)
    plain = CachedHead(plain_head)(hidden, ids, torch.ones(1, 6, dtype=torch.bool))
    values = head(hidden, ids, torch.ones(1, 6, dtype=torch.bool))
    torch.testing.assert_close(values[:, :2], plain[:, :2])
    torch.testing.assert_close(
        values[:, 2:], plain[:, 2:] * torch.exp(torch.tensor(-10.0)), rtol=1e-3, atol=0
    )
    masked = torch.tensor([[True, True, False, True, True, True]])  # a position that does not count
    torch.testing.assert_close(head(hidden, ids, masked), plain)


def test_critic_attention_head_reads_the_prompt_and_not_the_future():
    from benchmarks.prototypes.critic_heads import AttentionHazardHead
    from wmtp_train.model import PRESETS

    torch.manual_seed(0)
    head = AttentionHazardHead(PRESETS["micro"])
    torch.nn.init.normal_(head.value.proj.weight)  # a value that depends on its input
    hidden, ids = torch.randn(1, 8, PRESETS["micro"].dim), torch.randint(0, 256, (1, 8))
    mask = torch.tensor([[False] * 4 + [True] * 4])  # prompt 0-3, completion 4-7
    values = head(hidden, ids, mask)
    later = ids.clone()
    later[0, 6] = (later[0, 6] + 1) % 256
    torch.testing.assert_close(head(hidden, later, mask)[:, :6], values[:, :6])
    prompt = ids.clone()
    prompt[0, 1] = (prompt[0, 1] + 1) % 256
    assert not torch.allclose(head(hidden, prompt, mask)[:, 4:], values[:, 4:])


def test_same_run_prints_each_setting_with_the_chunk_length_the_loop_uses(capsys):
    from benchmarks.prototypes.same_run import main

    # 1 x 16 x 2 rows: 15 + 14 = 29 valid; chunk_size 10 -> 3 chunks of 10, 20 -> 2 chunks of 15.
    main(["--shape", "1,16,2,8,50", "--rounds", "2", "--impls", "", "--chunks", "10,20,default"])
    cells = [line.split("|") for line in capsys.readouterr().out.splitlines()]
    rows = {
        c[1].strip(): c[2].strip()
        for c in cells
        if len(c) > 2 and c[1].strip() in ("floor", "ours", "ours@10", "ours@20")
    }
    assert rows == {"floor": "", "ours@10": "10", "ours@20": "15", "ours": "29"}
