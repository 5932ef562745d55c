"""Per-GPU memory of a LoRA run, counted: parameters and optimizer state from the model, activations measured.

Until the trainer has a memory estimator, this is the documented count for a model preset (default
``7b_1t_4``) with the default ``[lora]`` table, FSDP2 over W GPUs and bf16 mixed precision, no activation
checkpointing:

- frozen base, fp32 shards (the trainer keeps fp32 master parameters): ``4 P_base / W``;
- trained parameters (adapters + value head), fp32 shards, with gradients and AdamW's two moments:
  ``16 P_trained / W``; plus the unsharded fp32 value-head snapshot V_old;
- FSDP2's unsharded bf16 copies while a group runs: at most the two largest groups (current + prefetch);
- activations saved for backward: per token, measured on one block and on the output head built at the
  preset's shapes in bf16 on this CPU (saved-tensor hooks, each storage counted once), times
  ``b T (n_blocks, 1)``; plus ``2 b T^2`` bytes per block for the padding mask, which SDPA turns into a
  bf16 bias that the memory-efficient CUDA kernel keeps for backward (CPU attention here runs unmasked).

The CPU stands in for the GPU: the same modules save the same tensors, except that the loss runs the
chunked PyTorch path instead of the Triton kernel (both keep per-chunk state only). Prints one JSON object.

    python benchmarks/lora_memory.py [--preset 7b_1t_4] [--seq 2048] [--micro-batch 1 4] [--world-size 1 2]
"""

from __future__ import annotations

import argparse
import json

import torch

from wmtp_train.model import LoRAOptions, ModelArgs, apply_lora, build_model, resolve_args
from wmtp_train.model.layers import TransformerBlock, rotary_tables
from wmtp_train.model.mtp import LossOptions, MTPOutputHead

GIB = 2**30
USABLE_GIB = 78.0
"""What an 80 GB H100 leaves to PyTorch (about 78 GiB)."""
MARGIN_GIB = 4.0
"""Kept free for the CUDA context, allocator fragmentation and backward's transient gradients."""


def saved_bytes(run, module: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` builds its graph, ``module``'s
    parameters excepted (FSDP2 frees its gathered copies after forward and gathers them again for
    backward)."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    del out
    return sum(storages.values())


def activation_bytes_per_token(args: ModelArgs, lora: LoRAOptions, tokens: int) -> tuple[float, float]:
    """(one adapted block, the output head + loss) saved bytes per token, bf16, base frozen."""
    torch.manual_seed(0)
    block = TransformerBlock(args).to(torch.bfloat16)
    holder = torch.nn.Module()  # apply_lora walks layers / extra_heads: a lone block is head 1's
    holder.layers, holder.extra_heads = torch.nn.ModuleList([block]), torch.nn.ModuleList()
    apply_lora(holder, lora)
    for name, param in block.named_parameters():
        param.requires_grad_(lora.is_trained(name))
    x = torch.randn(1, tokens, args.dim, dtype=torch.bfloat16, requires_grad=True)
    rotary = rotary_tables(torch.arange(tokens), args.head_dim, args.rope_theta)
    per_block = saved_bytes(lambda: block(x, rotary, None), block) / tokens

    head = MTPOutputHead(args).to(torch.bfloat16).requires_grad_(lora.train_output_head)
    hidden = torch.randn(1, tokens, args.n_future_tokens, args.dim, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, args.vocab_size, (1, tokens))
    weights = torch.ones(1, tokens)
    loss_options = LossOptions(reduction="sum")
    per_head = (
        saved_bytes(lambda: head(hidden, labels, weights=weights, loss_options=loss_options).loss, head)
        / tokens
    )
    return per_block, per_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="7b_1t_4")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--world-size", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--measure-tokens", type=int, default=256, help="tokens of the CPU measurement")
    args = parser.parse_args()

    model_args = resolve_args(args.preset)
    lora = LoRAOptions(enabled=True)
    model = build_model(model_args, device="meta")
    apply_lora(model, lora)
    named = dict(model.named_parameters())
    trained = sum(p.numel() for name, p in named.items() if lora.is_trained(name))
    base = sum(p.numel() for name, p in named.items() if not lora.is_trained(name))
    groups = [*model.layers, *model.extra_heads, model.head, model.value_head]
    group_bf16 = sorted(sum(p.numel() for p in g.parameters()) * 2 for g in groups)[-2:]
    group_bf16.append(model.tok_embeddings.weight.numel() * 2)  # the root (embedding) while it runs
    transient = sum(sorted(group_bf16)[-2:])
    snapshot = sum(p.numel() for p in model.value_head.parameters()) * 4
    per_block, per_head = activation_bytes_per_token(model_args, lora, args.measure_tokens)
    n_blocks = len(model.layers) + len(model.extra_heads)

    rows = []
    for world in args.world_size:
        for batch in args.micro_batch:
            tokens = batch * args.seq
            activations = tokens * (n_blocks * per_block + per_head) + n_blocks * 2 * batch * args.seq**2
            parts = {
                "frozen_base": 4 * base / world,
                "trained_with_grads_and_adamw": 16 * trained / world,
                "value_snapshot": snapshot,
                "unsharded_bf16_groups": transient,
                "activations": activations,
            }
            total = sum(parts.values())
            rows.append(
                {
                    "world_size": world,
                    "micro_batch": batch,
                    **{f"{k}_gib": round(v / GIB, 2) for k, v in parts.items()},
                    "total_gib": round(total / GIB, 1),
                    "fits_80gb": total / GIB <= USABLE_GIB - MARGIN_GIB,
                }
            )
    report = {
        "preset": args.preset,
        "seq": args.seq,
        "lora": lora.__dict__,
        "parameters_base": base,
        "parameters_trained": trained,
        "full_finetune_state_gib": round(
            16 * sum(p.numel() for n, p in named.items() if ".lora_" not in n) / GIB, 1
        ),
        "activation_bytes_per_token_per_block": round(per_block),
        "activation_bytes_per_token_output_head": round(per_head),
        "rows": rows,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
