"""Run the ported MNIST example end to end on scikit-learn's digits."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="examples/mnist.py --data digits needs scikit-learn")

ROOT = Path(__file__).resolve().parents[1]


def test_mnist_example_on_digits(tmp_path):
    weights = tmp_path / "convnet.pt"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mnist.py"), "--data", "digits", "--epochs", "3",
         "--threads", "1", "--save", str(weights)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("epoch")]
    assert len(lines) == 3
    acc = float(lines[-1].split("test accuracy ")[1].split()[0])
    # Three epochs of a ConvNet on 8x8 digits reach well above chance (0.1);
    # the bound is loose so the test checks wiring, not tuning.
    assert acc > 0.8
    assert weights.stat().st_size > 0


def test_mnist_example_help():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "mnist.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--data" in proc.stdout
