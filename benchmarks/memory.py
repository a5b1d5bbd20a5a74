"""Optimizer memory: state bytes per parameter and the peak extra memory of a step.

For every sfoptim class and the peers that are installed, on parameters of
each ``--dtype``, the script builds the optimizer on its own copy of the
layout's parameters, takes two steps (the first allocates the state) and
measures the second:

* **state bytes per parameter**: the bytes of every tensor the optimizer keeps
  in ``optimizer.state`` (a tensor subclass such as torchao's 8-bit state is
  counted by the plain tensors it is made of), divided by the number of
  parameter elements. Parameters and gradients are not counted. This figure
  does not depend on the machine.
* **peak extra memory of a step**, in bytes per parameter: the most memory the
  step holds beyond what was allocated when it began. On CUDA,
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On
  CPU, the allocations and frees that torch's profiler records
  (``profile_memory=True``) during the step, added up in time order: every
  tensor torch allocates, however short-lived; memory allocated outside torch
  (sfoptim's C kernel keeps a work list of 24 bytes per 16K elements) is not
  counted.

Peers: ``torch.optim.AdamW`` (fused where it runs), torchao's ``AdamW8bit``,
HeavyBall's ``SFAdamW`` and ``ForeachAdamW``, and the published
``schedulefree``'s ``AdamWScheduleFree``, each only if it can be imported
(``pip install -e '.[bench]'`` installs them); a missing one is listed as
skipped.

Examples::

    python benchmarks/memory.py                          # 20M layout, float32 and bfloat16, CPU
    python benchmarks/memory.py --layout tiny --dtype float32   # smoke run
    python benchmarks/memory.py --device cuda
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

LAYOUTS: dict[str, list[tuple[int, ...]]] = {
    # The layout of benchmarks/step_time.py's 20M: 4 x 512x8192, 256x12288, 13 vectors.
    "20M": [(512, 8192)] * 4 + [(256, 12288)] + [(8192,)] * 13,
    "tiny": [(64, 32), (100,), (7,)],
}


class _WithLoss:
    """Steps ScheduleFree+ (which takes the loss) with a fixed loss."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.state = opt.state

    def step(self) -> None:
        self.opt.step(loss=torch.tensor(1.0))  # type: ignore[call-arg]


def contenders() -> dict[str, Callable[[list], Any]]:
    """name -> factory; peers that cannot be imported are reported and left out."""
    import sfoptim

    lr = 1e-3
    out: dict[str, Callable[[list], Any]] = {
        "torch AdamW": lambda p: torch.optim.AdamW(p, lr=lr, fused=True),
        "torch SGD-momentum": lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
        "sfoptim SGD": lambda p: sfoptim.SGDScheduleFree(p, lr=lr),
        "sfoptim AdamW": lambda p: sfoptim.AdamWScheduleFree(p, lr=lr),
        "sfoptim AdamW state_dtype=float32": lambda p: sfoptim.AdamWScheduleFree(p, lr=lr, state_dtype=torch.float32),
        "sfoptim AdamW bf16-state": lambda p: sfoptim.AdamWScheduleFree(p, lr=lr, state_precision="bf16"),
        "sfoptim AdamW 8bit": lambda p: sfoptim.AdamWScheduleFree(p, lr=lr, state_precision="8bit"),
        "sfoptim RAdam": lambda p: sfoptim.RAdamScheduleFree(p, lr=lr),
        "sfoptim ScheduleFree+": lambda p: _WithLoss(sfoptim.AdamCScheduleFreePlus(p)),
        "sfoptim Prodigy": lambda p: sfoptim.ProdigyScheduleFree(p),
        "sfoptim Muon": lambda p: sfoptim.MuonScheduleFree(p, lr=0.02, adamw_lr=lr),
    }
    try:
        from torchao.optim import AdamW8bit

        out["torchao AdamW8bit"] = lambda p: AdamW8bit(p, lr=lr)
    except Exception as exc:  # not installed, or not built for this torch
        print(f"skipped: torchao AdamW8bit ({type(exc).__name__}: {str(exc)[:80]})")
    try:
        import heavyball

        out["heavyball SFAdamW"] = lambda p: heavyball.SFAdamW(p, lr=lr)
        out["heavyball ForeachAdamW"] = lambda p: heavyball.ForeachAdamW(p, lr=lr)
    except Exception as exc:
        print(f"skipped: heavyball ({type(exc).__name__}: {str(exc)[:80]})")
    try:
        import schedulefree

        out["schedulefree AdamW"] = lambda p: _train(schedulefree.AdamWScheduleFree(p, lr=lr))
    except Exception as exc:
        print(f"skipped: schedulefree ({type(exc).__name__}: {str(exc)[:80]})")
    return out


def _train(opt: Any) -> Any:
    opt.train()
    return opt


def state_bytes(opt: Any) -> int:
    """Bytes of all tensors in the optimizer's state, each storage counted once."""
    seen: set[int] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
                for n in value.__tensor_flatten__()[0]:
                    visit(getattr(value, n))
                return
            if value.numel() == 0:
                return
            ptr = value.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for per_param in opt.state.values():
        visit(per_param)
    return total


def _step(opt: Any, params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()


def _peak_cpu(step: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _peak_cuda(step: Callable[[], None], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure(layout: str, dtypes: list[str], device: torch.device) -> dict[tuple[str, str], tuple[float, float]]:
    """(contender, dtype) -> (state bytes per parameter, peak extra bytes per parameter of a step)."""
    shapes = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(0)
    init32 = [torch.randn(s, generator=gen) for s in shapes]
    grads32 = [torch.randn(s, generator=gen).mul_(1e-2) for s in shapes]
    numel = sum(t.numel() for t in init32)
    table = contenders()
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for dname in dtypes:
        dtype = getattr(torch, dname)
        grads = [g.to(device=device, dtype=dtype) for g in grads32]
        for cname, factory in table.items():
            params = [torch.nn.Parameter(t.to(device=device, dtype=dtype)) for t in init32]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opt = factory(params)
                    step = functools.partial(_step, opt, params, grads)
                    step()
                    peak = _peak_cuda(step, device) if device.type == "cuda" else _peak_cpu(step)
            except Exception as exc:  # a peer that does not run on this dtype or device is reported
                print(f"skipped on {dname}: {cname} ({type(exc).__name__}: {str(exc)[:100]})")
                continue
            out[(cname, dname)] = (state_bytes(opt) / numel, peak / numel)
            del opt, params
    return out


def main(argv: list[str] | None = None) -> dict[tuple[str, str], tuple[float, float]]:
    """Measures and prints the table; returns it by (contender, dtype)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--layout", default="20M", choices=list(LAYOUTS), help="parameter shapes (default 20M)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "float64", "bfloat16", "float16"],
                        help="parameter dtypes (default: float32 bfloat16)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    torch.set_num_threads(args.threads)
    numel = sum(torch.Size(s).numel() for s in LAYOUTS[args.layout])
    print(f"torch {torch.__version__}, device {device}, layout {args.layout} ({numel / 1e6:.2f}M parameters in "
          f"{len(LAYOUTS[args.layout])} tensors), python {sys.version.split()[0]}")
    results = measure(args.layout, args.dtype, device)
    names = list(dict.fromkeys(c for c, _ in results))
    width = max(len(n) for n in names) + 2
    print("\nbytes per parameter: optimizer state | peak extra memory of a step "
          + ("(CUDA allocator)" if device.type == "cuda" else "(torch CPU allocations, torch.profiler)"))
    print("".ljust(width) + "".join(f"{d:>22}" for d in args.dtype))
    for n in names:
        cells = [f"{results[(n, d)][0]:6.2f} | {results[(n, d)][1]:6.2f}" if (n, d) in results else "-" for d in args.dtype]
        print(n.ljust(width) + "".join(c.rjust(22) for c in cells))
    return results


if __name__ == "__main__":
    main()
