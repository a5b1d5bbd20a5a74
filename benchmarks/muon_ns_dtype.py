"""Step time of schedule-free Muon by Newton-Schulz dtype, against torch.optim.Muon + fused AdamW.

On the machine it runs on, times one optimizer step of

* ``torch.optim.Muon`` (``adjust_lr_fn="match_rms_adamw"``, bfloat16
  Newton-Schulz, as it always computes) on the matrices with
  ``torch.optim.AdamW(fused=True)`` on the embedding and the vectors: the
  baseline,
* ``sfoptim.MuonScheduleFree`` with ``ns_dtype`` float32, bfloat16 and
  ``"auto"`` (the default, which picks one of the two from the hardware:
  ``sfoptim.directions.muon.has_native_bf16``), on the same split
  (``use_muon`` groups).

Every contender has its own parameters (same values) and one set of fixed
gradients, attached before every step outside the timing. Each round steps
every contender once, in a rotating order, so that slow drifts reach all of
them alike. The table gives the median step time of each contender and its
ratio to the baseline's median in the same rounds. The first step of each
(state allocation) is not timed.

Examples::

    python benchmarks/muon_ns_dtype.py                     # CPU, width 384, 4 matrices
    python benchmarks/muon_ns_dtype.py --width 768 --rounds 5
    python benchmarks/muon_ns_dtype.py --device cuda --width 2048
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import sfoptim
from sfoptim.directions.muon import BF16_CPU_CAPABILITIES, has_native_bf16, resolve_ns_dtype

BASELINE = "torch Muon + AdamW(fused)"


class _Pair:
    """``torch.optim.Muon`` on the matrices and ``torch.optim.AdamW(fused=True)`` on the rest, stepped together."""

    def __init__(self, matrices: list[nn.Parameter], rest: list[nn.Parameter], lr: float) -> None:
        self.muon = torch.optim.Muon(matrices, lr=lr, adjust_lr_fn="match_rms_adamw", weight_decay=0.0)
        self.adamw = torch.optim.AdamW(rest, lr=lr, weight_decay=0.0, fused=True)

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()


def layout(width: int, matrices: int, vocab: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Shapes of the orthogonalized matrices (MLP-like, alternating ``w x 4w`` and ``4w x w``) and of the rest."""
    mats = [(width, 4 * width) if i % 2 == 0 else (4 * width, width) for i in range(matrices)]
    rest = [(vocab, width)] + [(width,)] * (2 * matrices) + [(4 * width,)] * (matrices // 2)
    return mats, rest


def contenders(lr: float) -> dict[str, Callable[[list, list], object]]:
    def sf(ns_dtype: torch.dtype | str) -> Callable[[list, list], object]:
        def make(mats: list, rest: list) -> object:
            return sfoptim.MuonScheduleFree(
                [{"params": mats, "use_muon": True}, {"params": rest, "use_muon": False}], lr=lr, ns_dtype=ns_dtype
            )

        return make

    return {
        BASELINE: lambda mats, rest: _Pair(mats, rest, lr),
        "MuonScheduleFree ns_dtype=float32": sf(torch.float32),
        "MuonScheduleFree ns_dtype=bfloat16": sf(torch.bfloat16),
        'MuonScheduleFree ns_dtype="auto"': sf("auto"),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """``(contender, median seconds, ratio to the baseline)`` rows, baseline first."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    mat_shapes, rest_shapes = layout(args.width, args.matrices, args.vocab)
    values = [torch.randn(s, device=device) * 0.02 for s in mat_shapes + rest_shapes]
    grads = [torch.randn(s, device=device) for s in mat_shapes + rest_shapes]
    made = {}
    for name, make in contenders(args.lr).items():
        params = [nn.Parameter(v.clone()) for v in values]
        made[name] = (params, make(params[: len(mat_shapes)], params[len(mat_shapes) :]))
    times: dict[str, list[float]] = {name: [] for name in made}
    names = list(made)
    for round_ in range(args.warmup + 1 + args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            params, opt = made[name]
            for p, g in zip(params, grads):
                p.grad = g
            _sync(device)
            start = time.perf_counter()
            opt.step()  # type: ignore[attr-defined]
            _sync(device)
            if round_ > args.warmup:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times[BASELINE])
    return [(name, statistics.median(ts), statistics.median(ts) / base) for name, ts in times.items()]


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--width", type=int, default=384, help="model width w (default 384)")
    parser.add_argument("--matrices", type=int, default=4, help="orthogonalized matrices, w x 4w and 4w x w in turn (default 4)")
    parser.add_argument("--vocab", type=int, default=256, help="rows of the embedding, stepped by AdamW (default 256)")
    parser.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first step (default 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of every contender (default 1e-3)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        found = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        reported = {name: bool(found.get(name, False)) for name in BF16_CPU_CAPABILITIES if name in found}
        hardware = f"CPU, {torch.get_num_threads()} threads, bfloat16 capabilities {reported or 'not reported'}"
    else:
        hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"{hardware}; native bfloat16: {has_native_bf16(device)}; "
          f'"auto" resolves to {resolve_ns_dtype("auto", device)}')  # fmt: skip
    mats, _ = layout(args.width, args.matrices, args.vocab)
    print(f"{len(mats)} matrices of {mats[0][0]}x{mats[0][1]} (and transposed), median of {args.rounds} rounds\n")
    rows = run(args)
    print(f"| contender | median step | ratio to {BASELINE} |")
    print("|---|---|---|")
    for name, median, ratio in rows:
        print(f"| {name} | {median * 1e3:.1f} ms | {ratio:.2f} |")
    return rows


if __name__ == "__main__":
    main()
