"""Run by ``test_parallel.py`` (under ``torchrun`` or as one process; gloo, CPU): one stage-2 step of a
recipe on the micro model (two micro-batches per rank, no clipping) for each variant given on the command
line, ``section.key=value`` overrides joined by commas:

    python step_worker.py OUT RECIPE parallel.activation_checkpoint=none parallel.activation_checkpoint=full

Rank 0 saves, per variant, the step's loss, the full gradients before the optimizer step, the fused loss
operator's forward calls (not counted with compiled blocks) and each transformer block's forward calls to
``OUT``.
"""

import contextlib
import sys

import torch
import torch.distributed as dist

from wmtp_train.config_files import load_recipe
from wmtp_train.data.tokenizer import load_tokenizer
from wmtp_train.train.memory import LossOpCounter, synthetic_batch
from wmtp_train.train.model_builder import ModelBuilder
from wmtp_train.train.parallelize import full_tensor, init_distributed, transformer_blocks
from wmtp_train.train.stages import build_stages
from wmtp_train.train.step import StageContext, TrainerState

MICRO_BATCHES, BATCH, SEQ = 2, 2, 48


def one_step(recipe, variant, info):
    overrides = ["model.preset=micro", "run.device=cpu", f"data.max_len={SEQ}", "stage2.max_grad_norm=0"]
    overrides += [f"stage2.micro_batch_size={BATCH}", f"stage2.grad_accum={MICRO_BATCHES}"]
    config = load_recipe(recipe, overrides + variant.split(","))
    builder = ModelBuilder(config, info, load_tokenizer(None).vocab_size)
    model = builder.build("")
    context = StageContext(config, model, builder.args, info, TrainerState(stage="stage2"))
    stage = build_stages(context, builder)["stage2"]
    stage.prepare()
    grads = {}
    finish = stage._finish_update

    def record_gradients(applied, norm):
        for name, param in model.named_parameters():
            if param.grad is not None:
                grads[name] = full_tensor(param.grad).clone()
        finish(applied, norm)

    stage._finish_update = record_gradients
    block_calls = [0] * len(transformer_blocks(model))
    for i, block in enumerate(transformer_blocks(model)):
        block.register_forward_pre_hook(
            lambda module, args, i=i: block_calls.__setitem__(i, block_calls[i] + 1)
        )
    batches = [
        synthetic_batch(builder.args, BATCH, SEQ, seed=10 * info.rank + i) for i in range(MICRO_BATCHES)
    ]
    counter = LossOpCounter()  # a dispatch mode, which torch.compile refuses: not with compiled blocks
    with contextlib.nullcontext() if config.parallel.compile else counter:
        result = stage.step(batches)
    return {
        "loss": result.metrics["total_loss"],
        "grads": grads,
        "loss_calls": counter.calls,
        "block_calls": block_calls,
    }


def main():
    info = init_distributed("cpu")
    out, recipe, *variants = sys.argv[1:]
    results = {variant: one_step(recipe, variant, info) for variant in variants}
    if info.is_main:
        torch.save(results, out)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
