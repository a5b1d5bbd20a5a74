"""A small end-to-end schedule-free training run: the train/eval pattern in full.

Trains an MLP on a synthetic regression task with sfoptim.AdamWScheduleFree,
evaluating at x after every epoch. Runs in seconds on a laptop CPU.

    python examples/train_mlp.py --epochs 5
"""

from __future__ import annotations

import argparse

import torch

import sfoptim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x = torch.randn(2048, 16)
    y = torch.sin(x @ torch.randn(16, 1) / 4) + 0.05 * torch.randn(2048, 1)
    train, held_out = (x[:1536], y[:1536]), (x[1536:], y[1536:])
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    optimizer = sfoptim.AdamWScheduleFree(model.parameters(), lr=args.lr, warmup_steps=50)

    for epoch in range(args.epochs):
        model.train()
        optimizer.train()  # parameters hold y, where gradients are taken
        for idx in torch.randperm(len(train[0])).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(train[0][idx]), train[1][idx])
            loss.backward()
            optimizer.step()
        model.eval()
        optimizer.eval()  # parameters hold x, the average to evaluate and save
        with torch.no_grad():
            held = torch.nn.functional.mse_loss(model(held_out[0]), held_out[1]).item()
        print(f"epoch {epoch + 1}: held-out MSE {held:.4f}")


if __name__ == "__main__":
    main()
