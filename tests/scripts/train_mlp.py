"""A small training script, run unchanged by tests/test_run.py: an MLP on fixed random
data with SGD, under torchrun with gloo DDP when WORLD_SIZE is set."""

import argparse
import os

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--save", default="")
    parser.add_argument("--raise-at", type=int, default=0)
    args = parser.parse_args()

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(16, 4, generator=generator)
    y = torch.randn(16, 1, generator=generator)

    for step in range(1, args.steps + 1):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == args.raise_at:
            raise RuntimeError(f"failed at step {step}")
        opt.step()
        print(f"rank {rank} step {step} loss {loss.item():.6f}")

    if args.save:
        path = f"{args.save}.rank{rank}" if distributed else args.save
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
