"""A rank of tests/test_apply.py's DistributedDataParallel test: `python -m tests.ddp_worker RANK PORT ORDER OUT`
plans a small classifier with remat.apply, wraps it in DDP (or plans DDP(model) when ORDER is remat-of-ddp), runs one
step on this rank's batch and writes its parameters' gradients to OUT (torch.save)."""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import remat


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.body(x), y)


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(128, 16, generator=generator, dtype=torch.float64),
            torch.randint(0, 4, (128,), generator=generator))


def main(rank: int, port: int, order: str, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = Classifier().double()
    x, y = batch(rank)
    if order == "ddp-of-remat":
        step = nn.parallel.DistributedDataParallel(remat.apply(model, budget="90%", example_inputs=(x, y),
                                                               device="cpu", time_limit=3, gradients="held"))
    else:  # (held: 90% of the set-to-none step is below its floor, the gradients made at the backward's end)
        step = remat.apply(nn.parallel.DistributedDataParallel(model), budget="90%", example_inputs=(x, y),
                           device="cpu", time_limit=3, gradients="held")
    step(x, y).backward()
    recomputed = len((step.module if order == "ddp-of-remat" else step).planned.plan.schedule.recomputed_nodes())
    torch.save({"grads": [p.grad for p in model.parameters()], "recomputed": recomputed}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
