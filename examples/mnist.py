"""Train a small ConvNet on MNIST with schedule-free AdamW.

The train/eval pattern is the part to copy: call ``optimizer.train()`` before
training steps and ``optimizer.eval()`` before evaluating or saving, because the
weights a schedule-free optimizer evaluates (the average ``x``) differ from the
ones it takes gradients at.  There is no learning-rate scheduler anywhere.

Data:
  --data mnist   real MNIST.  Reads the four IDX files (optionally .gz) from
                 --data-dir; if they are not there and torchvision is
                 installed, torchvision downloads them into that folder.
  --data digits  scikit-learn's bundled 8x8 digits (no download; runs anywhere).

Examples:
  python examples/mnist.py --data-dir ~/data/mnist
  python examples/mnist.py --data digits --epochs 5
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import sfoptim

MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> torch.Tensor:
    """Read one IDX file (the format MNIST is distributed in), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        _zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if dtype != 0x08:
            raise ValueError(f"{path}: only unsigned-byte IDX files are supported")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = f.read()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape)


def _find(folder: Path, stem: str):
    for cand in (folder / stem, folder / (stem + ".gz"), folder / "MNIST" / "raw" / stem,
                 folder / "MNIST" / "raw" / (stem + ".gz")):
        if cand.exists():
            return cand
    return None


def load_mnist(folder: Path):
    """Real MNIST as float tensors ``(x_train, y_train, x_test, y_test)``, normalised."""
    found = {k: _find(folder, v) for k, v in MNIST_FILES.items()}
    if not all(found.values()):
        try:
            import torchvision
        except ImportError:
            raise SystemExit(
                f"MNIST files not found in {folder} (expected {', '.join(MNIST_FILES.values())}, "
                "optionally .gz) and torchvision is not installed to download them. "
                "Use --data digits to run without MNIST.") from None
        torchvision.datasets.MNIST(str(folder), train=True, download=True)
        torchvision.datasets.MNIST(str(folder), train=False, download=True)
        found = {k: _find(folder, v) for k, v in MNIST_FILES.items()}
    x_tr, y_tr, x_te, y_te = (read_idx(found[k]) for k in ("train_x", "train_y", "test_x", "test_y"))
    # The usual MNIST mean/std, so the ConvNet sees inputs of unit scale.
    norm = lambda x: ((x.float() / 255.0 - 0.1307) / 0.3081).unsqueeze(1)  # noqa: E731
    return norm(x_tr), y_tr.long(), norm(x_te), y_te.long()


def load_digits(seed: int = 0):
    """scikit-learn's 8x8 digits, split 80/20 with a fixed seed, standardised."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    mean, std = x[n_test:].mean(), x[n_test:].std()
    x = (x - mean) / std
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


class ConvNet(nn.Module):
    """Two 3x3 convolutions, max-pooling, dropout and two linear layers."""

    def __init__(self, side: int, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.drop1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(64 * (side // 2) ** 2, 128)
        self.drop2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.drop1(x).flatten(1)
        x = self.drop2(F.relu(self.fc1(x)))
        return self.fc2(x)


def evaluate(model, x, y, batch=1000):
    """Mean loss and accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            out = model(x[i:i + batch])
            loss += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
            correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    return loss / len(y), correct / len(y)


def main(argv=None):
    """Parse arguments, train, and print held-out loss and accuracy per epoch."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--data-dir", default="data", help="folder holding (or receiving) the MNIST files")
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.0025)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in total (0: no limit)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: min(2, CPUs))")
    p.add_argument("--save", help="save the evaluated (averaged) weights to this file")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads or min(2, os.cpu_count() or 1))
    torch.manual_seed(a.seed)
    x_tr, y_tr, x_te, y_te = load_digits() if a.data == "digits" else load_mnist(Path(a.data_dir))
    model = ConvNet(side=x_tr.shape[-1])
    optimizer = sfoptim.AdamWScheduleFree(model.parameters(), lr=a.lr, warmup_steps=a.warmup_steps,
                                          weight_decay=a.weight_decay)
    g = torch.Generator().manual_seed(a.seed)
    step = 0
    for epoch in range(1, a.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        optimizer.train()  # parameters back to the point y where gradients are taken
        perm = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(perm), a.batch_size):
            idx = perm[i:i + a.batch_size]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if a.max_steps and step >= a.max_steps:
                break
        optimizer.eval()  # parameters now hold the averaged point x
        test_loss, test_acc = evaluate(model, x_te, y_te)
        print(f"epoch {epoch}: step {step}, train batch loss {loss.item():.4f}, "
              f"test loss {test_loss:.4f}, test accuracy {test_acc:.4f} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
        if a.max_steps and step >= a.max_steps:
            break
    if a.save:
        optimizer.eval()
        torch.save(model.state_dict(), a.save)
    return test_acc


if __name__ == "__main__":
    main()
