"""Time of each pass of schedule-free Prodigy's CPU kernel, against plain reads of its streams.

A fused Prodigy step on CPU is three C calls per bucket (see docs/precision.md,
"Schedule-free Prodigy on the CPU kernel"): the sums (reads ``g``, ``z``,
``p0``, ``s``), the clip (reads ``g``, ``v``; left out with
``update_clip=None``) and the update (reads ``y``, ``g``, ``z``, ``v``, ``s``
and writes ``y``, ``z``, ``v``, ``s``). This script times, interleaved in the
same rounds and relative to ``torch.optim.AdamW(fused=True)`` on parameters of
the same layout:

* ``sums``: the sums pass alone;
* ``step``: clip and update (``update_clip`` binding or not, the pass is run);
* ``update``: the update alone (the clip's limit set to 0);
* ``clip`` = ``step`` - ``update``;
* ``read 4`` and ``read 2``: ``torch.dot`` over the same number of read-only
  streams as the sums and the clip, what reading those bytes costs here.

Run it on an otherwise idle machine, e.g.
``python benchmarks/prodigy_passes.py --layouts 8x2M 20M --threads 1 2``.
"""

from __future__ import annotations

import argparse
import time

import torch

from sfoptim.backends import cpu_kernel
from sfoptim.backends.abi import KERNEL_SCALARS, BucketSum, Kind

LAYOUTS = {"8x2M": [2_000_000] * 8, "20M": [20_000_000]}
SCALARS = dict(
    lr=1e-3, ckp1=0.1, beta=0.9, wd=0.0, beta2=0.999, bc2=1.0, eps=1e-8, mu=0.0, bc1=1.0,
    d=1e-6, d_new=1.1e-6, accum=1e-12, rho=0.999**0.5, clip=1.0, wdz=0.0,
)  # fmt: skip


def contenders(sizes: list[int], dtype: torch.dtype) -> dict:
    def tensors(positive: bool = False) -> list[torch.Tensor]:
        out = [torch.randn(n, dtype=dtype) for n in sizes]
        return [t.abs_() for t in out] if positive else out

    y, g, z, v, s, p0 = tensors(), tensors(), tensors(), tensors(True), tensors(), tensors()
    clipped = [dict(SCALARS)[k] for k in KERNEL_SCALARS]
    unclipped = [dict(SCALARS, clip=0.0)[k] for k in KERNEL_SCALARS]
    params = [torch.nn.Parameter(t.clone()) for t in y]
    for p, grad in zip(params, g):
        p.grad = grad.clone()
    adamw = torch.optim.AdamW(params, fused=True)
    wanted = [BucketSum.GRAD_P0_MINUS_Z, BucketSum.DECAYED_L1]
    return {
        "AdamW fused": adamw.step,
        "sums": lambda: cpu_kernel.sums(g, z, y, wanted, [p0, s], clipped),
        "step": lambda: cpu_kernel.step(y, g, z, [v, s], Kind.PRODIGY, clipped),
        "update": lambda: cpu_kernel.step(y, g, z, [v, s], Kind.PRODIGY, unclipped),
        "read 4": lambda: [torch.dot(a, b) for pair in ((g, z), (p0, s)) for a, b in zip(*pair)],
        "read 2": lambda: [torch.dot(a, b) for a, b in zip(g, v)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["20M"], choices=sorted(LAYOUTS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    if not cpu_kernel.available():
        raise SystemExit("the C kernel is not available here")
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {args.dtype}, median of {args.rounds} rounds, ratio to AdamW fused")
    for layout in args.layouts:
        for threads in args.threads:
            torch.set_num_threads(threads)
            fns = contenders(LAYOUTS[layout], dtype)
            times: dict[str, list[float]] = {k: [] for k in fns}
            for fn in fns.values():
                fn()
            for r in range(args.rounds):
                names = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
                for name in names:
                    start = time.perf_counter()
                    fns[name]()
                    times[name].append(time.perf_counter() - start)
            med = {k: sorted(t)[len(t) // 2] for k, t in times.items()}
            med["clip"] = med["step"] - med["update"]
            base = med["AdamW fused"]
            cells = "  ".join(f"{k} {v / base:.2f}x ({v * 1e3:.1f} ms)" for k, v in med.items() if k != "AdamW fused")
            total = (med["sums"] + med["step"]) / base
            print(f"{layout:>5} threads {threads}: AdamW {base * 1e3:.1f} ms  {cells}  sums+step {total:.2f}x")


if __name__ == "__main__":
    main()
