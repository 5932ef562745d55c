"""Stage-2 tokens/s of the trainer's step with ``parallel.compile`` on and off, on this machine.

One process, one rank: two copies of the model (same initial weights), one with every transformer block's
forward compiled, each with its own ``verifiable`` stage 2; the same synthetic full-length micro-batches.
After ``--warmup`` steps each (compilation), ``--rounds`` alternating blocks of ``--steps`` steps; reports
the median tokens/s of each and the median of the per-round ratios. Prints one JSON object.

    python benchmarks/bench_block_compile.py [--preset micro] [--batch 4] [--seq 384] [--rounds 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{names[0] if names else platform.machine()} ({os.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=384)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()

    from wmtp_train.config_files import load_recipe
    from wmtp_train.data.tokenizer import load_tokenizer
    from wmtp_train.train.memory import synthetic_batch
    from wmtp_train.train.model_builder import ModelBuilder
    from wmtp_train.train.parallelize import init_distributed
    from wmtp_train.train.stages import build_stages
    from wmtp_train.train.step import StageContext, TrainerState

    info = init_distributed("auto")

    def make_stage(compiled: bool):
        overrides = [f"model.preset={args.preset}", f"parallel.compile={str(compiled).lower()}"]
        overrides += [f"stage2.micro_batch_size={args.batch}", f"data.max_len={args.seq}"]
        config = load_recipe("verifiable", overrides)
        builder = ModelBuilder(config, info, load_tokenizer(None).vocab_size)
        model = builder.build("")
        context = StageContext(config, model, builder.args, info, TrainerState(stage="stage2"))
        stage = build_stages(context, builder)["stage2"]
        stage.prepare()
        return stage, builder.args

    stages = {"eager": make_stage(False), "compiled": make_stage(True)}
    model_args = stages["eager"][1]
    batches = []
    for i in range(args.steps):
        batch = synthetic_batch(model_args, args.batch, args.seq, seed=i)
        batches.append({k: v.to(info.device) if torch.is_tensor(v) else v for k, v in batch.items()})
    compile_s = {}
    for name, (stage, _) in stages.items():
        start = time.perf_counter()
        for i in range(args.warmup):
            stage.step([batches[i % len(batches)]])
        compile_s[name] = time.perf_counter() - start
    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for name, (stage, _) in stages.items():
            if info.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = sum(stage.step([batch]).tokens for batch in batches)
            if info.device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(tokens / (time.perf_counter() - start))
    ratios = [c / e for c, e in zip(rates["compiled"], rates["eager"])]
    print(
        json.dumps(
            {
                "benchmark": "stage-2 step, parallel.compile on vs off",
                "preset": args.preset,
                "micro_batch": f"{args.batch} x {args.seq}",
                "device": torch.cuda.get_device_name() if info.device.type == "cuda" else _cpu_name(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "date": datetime.date.today().isoformat(),
                "warmup_s": {k: round(v, 1) for k, v in compile_s.items()},
                "tokens_per_s": {k: round(statistics.median(v)) for k, v in rates.items()},
                "tokens_per_s_rounds": {k: [round(x) for x in v] for k, v in rates.items()},
                "compiled_over_eager_median": round(statistics.median(ratios), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
