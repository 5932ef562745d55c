"""Run by ``test_sharded_weight.py`` under ``torchrun --nproc_per_node=2`` (gloo, CPU): FSDP2 and the loss.

A DTensor ``lm_head_weight`` is refused with a message naming the patterns that work; both patterns give
the gradient of a single process that sees both ranks' data (FSDP2 averages over ranks).
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from wmtp_kernels import fused_weighted_mtp_loss

B, T, H, D, V = 2, 6, 2, 8, 20


class Head(torch.nn.Module):
    """Owns the unembedding; its forward (and ``loss``) call the fused loss with ``self.out.weight``."""

    def __init__(self):
        super().__init__()
        self.out = torch.nn.Linear(D, V, bias=False)

    def forward(self, hidden, labels):
        return fused_weighted_mtp_loss(hidden, self.out.weight, labels)

    def loss(self, hidden, labels):
        return fused_weighted_mtp_loss(hidden, self.out.weight, labels)


def sharded_head(mesh):
    torch.manual_seed(0)
    head = Head()
    full_weight = head.out.weight.detach().clone()
    fully_shard(head, mesh=mesh)
    return head, full_weight


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(B, T, H, D, generator=g), torch.randint(0, V, (B, T), generator=g)) for _ in range(2)
    ]
    hidden, labels = data[rank]

    head, _ = sharded_head(mesh)
    try:
        fused_weighted_mtp_loss(hidden, head.out.weight, labels)
        raise AssertionError("a DTensor lm_head_weight was accepted")
    except TypeError as error:
        for words in ("lm_head_weight is a DTensor", "inside the forward", "register_fsdp_forward_method"):
            assert words in str(error), str(error)

    for pattern in ("forward", "registered method"):
        head, full_weight = sharded_head(mesh)
        if pattern == "forward":
            head(hidden, labels).backward()
        else:
            register_fsdp_forward_method(head, "loss")
            head.loss(hidden, labels).backward()
        weight = full_weight.requires_grad_()
        sum(fused_weighted_mtp_loss(h, weight, y) for h, y in data).backward()
        torch.testing.assert_close(head.out.weight.grad.full_tensor(), weight.grad / 2, rtol=1e-6, atol=1e-7)
    print(f"rank {rank} OK", flush=True)
    dist.barrier()  # a rank that tears gloo down while its peer still talks aborts the peer (seen in CI)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
