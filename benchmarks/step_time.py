"""Optimizer step time, measured side by side in one interleaved run.

Every contender gets its own parameters (same values, same layout) and shares
one set of fixed gradients, re-attached before every step outside the timing
(heavyball sets ``p.grad`` to None; with ``weight_decay=0``, the default, no
contender writes into a gradient). Each round steps every contender once, in a
rotating order, so slow drifts (frequency changes, a background task) reach
all of them alike; the table reports the median step time of each contender
divided by the median of its baseline measured in the same rounds, on
parameters of the same dtype (``--dtype``: float32 and bfloat16 by default,
every dtype's contenders interleaved in the same rounds):

* Adam-like contenders against ``torch.optim.AdamW(fused=True)`` (ScheduleFree+
  among them, stepped with a fixed loss: its global sums over ``g``, ``y`` and
  ``z`` are part of the step it is timed on; schedule-free Prodigy too, with
  its sums and its update clip),
* SGD-like contenders against the fastest of ``torch.optim.SGD(momentum=0.9)``
  with ``fused=True`` and ``foreach=True`` (whichever is faster here),
* with ``--muon``, on the ``gpt`` layout: ``sfoptim.MuonScheduleFree`` against
  ``torch.optim.Muon`` on the hidden matrices with ``torch.optim.AdamW(fused=True)``
  on the embedding and the 1-D tensors, as torch recommends (both orthogonalize
  the same matrices in bfloat16 with the same Newton-Schulz iterations).

Run it on an otherwise idle machine. Contention for the cores does not slow
the contenders alike: torch's fused CPU optimizers split each tensor across
the threads in turn, waiting for all threads after every tensor, and slow down
several times more than sfoptim's kernel, which splits the whole bucket once
(with two threads on two busy cores, torch's fused AdamW took 7 to 12 times its
idle step time, sfoptim's AdamW about 3 times), so a loaded machine flatters
sfoptim.

The first ``step()`` of each contender (state allocation, kernel build or
``torch.compile``) is timed separately and excluded from the medians. The
sfoptim kernel cache is pointed at an empty directory first, so its first-step
time includes compiling the kernel (use ``--warm-cache`` to skip that).

Peers (``schedulefree``, ``pytorch_optimizer``, ``heavyball``) are optional:
a missing one is listed as skipped.

Layouts: ``8x2M`` (8 tensors of 2M), ``400x40K`` (400 of 40K), ``20M`` (4
matrices 512x8192, one 256x12288 and 13 vectors of 8192: 20.0M parameters in
18 tensors), ``gpt`` (a GPT-like model, see ``--gpt-width``), ``tiny`` (for
smoke runs only).

Examples::

    python benchmarks/step_time.py                      # CPU, 2 threads, float32 and bfloat16, all layouts
    python benchmarks/step_time.py --layouts 20M --dtype bfloat16 --no-heavyball
    python benchmarks/step_time.py --layouts 400x40K --rounds 30 --no-heavyball
    python benchmarks/step_time.py --device cuda        # on a GPU machine (adds peak-memory table)
    python benchmarks/step_time.py --layouts gpt --muon --only Muon --device cuda
    python benchmarks/step_time.py --layouts gpt --muon --only Muon --gpt-width 128 --rounds 10   # CPU

On CUDA the default sfoptim rows time the foreach path (the default there until
this table says otherwise); the ``fused=True`` rows time the compiled one-pass
kernel (``torch.compile``/Triton), whose first step includes its compilation.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

LAYOUTS: dict[str, list[tuple[int, ...]]] = {
    "8x2M": [(2_000_000,)] * 8,
    "400x40K": [(40_000,)] * 400,
    "20M": [(512, 8192)] * 4 + [(256, 12288)] + [(8192,)] * 13,
}
#: Layouts run by default (``tiny`` is for smoke runs).
DEFAULT_LAYOUTS = ["8x2M", "400x40K", "20M", "gpt"]


def _gpt_like(d: int = 768) -> list[tuple[int, ...]]:
    # Token embedding + 5 transformer blocks of 12 tensors (two layer norms,
    # qkv, attention projection, two MLP matrices, with biases): 61 tensors,
    # 47.0M parameters at width 768.
    vocab = 15104
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(5):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes


LAYOUTS["gpt"] = _gpt_like()
LAYOUTS["tiny"] = [(64, 32), (100,), (7,)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def contenders(args: argparse.Namespace) -> dict[str, tuple[str, Callable[[list], torch.optim.Optimizer]]]:
    """name -> (baseline group, factory). Groups: 'adam' or 'sgd'."""
    import sfoptim

    lr, wd = 1e-3, args.weight_decay
    out: dict[str, tuple[str, Callable]] = {}
    out["torch AdamW fused"] = ("adam", lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=wd, fused=True))
    out["torch AdamW foreach"] = ("adam", lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=wd, foreach=True))
    out["torch SGD-m fused"] = ("sgd", lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=wd, fused=True))
    out["torch SGD-m foreach"] = ("sgd", lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=wd, foreach=True))
    out["sfoptim AdamW"] = ("adam", lambda p: sfoptim.AdamWScheduleFree(p, lr=lr, weight_decay=wd))
    out["sfoptim AdamW bf16-state"] = ("adam", lambda p: sfoptim.AdamWScheduleFree(p, lr=lr, weight_decay=wd, state_precision="bf16"))
    out["sfoptim AdamW 8bit"] = ("adam", lambda p: sfoptim.AdamWScheduleFree(p, lr=lr, weight_decay=wd, state_precision="8bit"))
    out["sfoptim RAdam"] = ("adam", lambda p: sfoptim.RAdamScheduleFree(p, lr=lr, weight_decay=wd))
    out["sfoptim SGD"] = ("sgd", lambda p: sfoptim.SGDScheduleFree(p, lr=lr, weight_decay=wd))
    out["sfoptim ScheduleFree+"] = ("adam", lambda p: _WithLoss(sfoptim.AdamCScheduleFreePlus(p, weight_decay=wd)))
    out["sfoptim Prodigy"] = ("adam", lambda p: sfoptim.ProdigyScheduleFree(p, weight_decay=wd))
    if args.device.startswith("cuda"):
        out["sfoptim AdamW fused=True"] = ("adam", lambda p: sfoptim.AdamWScheduleFree(p, lr=lr, weight_decay=wd, fused=True))
        out["sfoptim RAdam fused=True"] = ("adam", lambda p: sfoptim.RAdamScheduleFree(p, lr=lr, weight_decay=wd, fused=True))
        out["sfoptim SGD fused=True"] = ("sgd", lambda p: sfoptim.SGDScheduleFree(p, lr=lr, weight_decay=wd, fused=True))
    if args.muon:
        # The first tensor of the gpt layout is the token embedding: AdamW's in both.
        out["torch Muon + AdamW"] = ("muon", lambda p: _MuonAndAdamW(p, lr, wd))
        # Same orthogonalization work as torch's: bfloat16 Newton-Schulz on every device.
        out["sfoptim Muon"] = ("muon", lambda p: sfoptim.MuonScheduleFree(
            [{"params": p[:1], "use_muon": False}, {"params": p[1:]}], lr=0.02, adamw_lr=lr, weight_decay=wd,
            ns_dtype=torch.bfloat16))
    if args.foreach_too:
        out["sfoptim AdamW foreach"] = ("adam", lambda p: sfoptim.AdamWScheduleFree(p, lr=lr, weight_decay=wd, fused=False))
        out["sfoptim SGD foreach"] = ("sgd", lambda p: sfoptim.SGDScheduleFree(p, lr=lr, weight_decay=wd, fused=False))
        out["sfoptim Prodigy foreach"] = ("adam", lambda p: sfoptim.ProdigyScheduleFree(p, weight_decay=wd, fused=False))

    def wanted(peer: str) -> bool:
        # Peers that --only leaves out are not even imported (pytorch_optimizer takes seconds).
        return not args.only or any(s.lower() in peer.lower() for s in args.only)

    if wanted("schedulefree AdamW RAdam SGD"):
        _add_schedulefree(out, lr, wd)
    if wanted("pytorch_optimizer SF-AdamW SF-RAdam SF-SGD"):
        _add_pytorch_optimizer(out, lr, wd)
    if args.heavyball and wanted("heavyball SFAdamW (compiled)"):
        try:
            import heavyball

            out["heavyball SFAdamW (compiled)"] = ("adam", lambda p: heavyball.SFAdamW(p, lr=lr, weight_decay=wd))
        except ImportError:
            print("skipped: heavyball (pip install heavyball)")
    if args.only:
        out = {k: v for k, v in out.items() if any(s.lower() in k.lower() for s in args.only) or k.startswith("torch")}
    return out


def _add_schedulefree(out: dict, lr: float, wd: float) -> None:
    try:
        import schedulefree

        out["schedulefree AdamW"] = ("adam", lambda p: _trained(schedulefree.AdamWScheduleFree(p, lr=lr, weight_decay=wd)))
        out["schedulefree RAdam"] = ("adam", lambda p: _trained(schedulefree.RAdamScheduleFree(p, lr=lr, weight_decay=wd)))
        out["schedulefree SGD"] = ("sgd", lambda p: _trained(schedulefree.SGDScheduleFree(p, lr=lr, weight_decay=wd)))
    except ImportError:
        print("skipped: schedulefree (pip install schedulefree)")


def _add_pytorch_optimizer(out: dict, lr: float, wd: float) -> None:
    try:
        from pytorch_optimizer import ScheduleFreeAdamW, ScheduleFreeRAdam, ScheduleFreeSGD

        out["pytorch_optimizer SF-AdamW"] = ("adam", lambda p: _trained(ScheduleFreeAdamW(p, lr=lr, weight_decay=wd)))
        out["pytorch_optimizer SF-RAdam"] = ("adam", lambda p: _trained(ScheduleFreeRAdam(p, lr=lr, weight_decay=wd)))
        out["pytorch_optimizer SF-SGD"] = ("sgd", lambda p: _trained(ScheduleFreeSGD(p, lr=lr, weight_decay=wd)))
    except ImportError:
        print("skipped: pytorch_optimizer (pip install pytorch_optimizer)")


class _WithLoss:
    """Steps an optimizer that takes the loss (ScheduleFree+) with a fixed one; the loss is not part of the work timed."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.loss = torch.tensor(1.0)

    def train(self) -> None:
        self.opt.train()  # type: ignore[attr-defined]

    def step(self) -> None:
        self.opt.step(loss=self.loss)  # type: ignore[call-arg]


class _MuonAndAdamW:
    """torch.optim.Muon on the hidden matrices, AdamW(fused=True) on the embedding and the 1-D tensors."""

    def __init__(self, params: list, lr: float, wd: float) -> None:
        hidden = [p for p in params[1:] if p.ndim == 2]
        rest = [params[0]] + [p for p in params[1:] if p.ndim != 2]
        self.muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=wd)
        self.adamw = torch.optim.AdamW(rest, lr=lr, weight_decay=wd, fused=True)

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()


def _trained(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    if hasattr(opt, "train"):
        opt.train()
    return opt


def run_layout(name: str, args: argparse.Namespace, device: torch.device) -> list[tuple]:
    """One interleaved run of every contender on every dtype of ``args.dtype``.

    Rows: (contender, dtype, group, median ms, ratio to the group's baseline of
    the same dtype, first step s, peak extra CUDA MiB).
    """
    shapes = LAYOUTS[name]
    gen = torch.Generator().manual_seed(0)
    init32 = [torch.randn(s, generator=gen) for s in shapes]
    grads32 = [torch.randn(s, generator=gen).mul_(1e-2) for s in shapes]
    table = contenders(args)
    opts: dict[tuple[str, str], torch.optim.Optimizer] = {}
    owned: dict[tuple[str, str], list[torch.nn.Parameter]] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    first: dict[tuple[str, str], float] = {}
    for dname in args.dtype:
        dtype = getattr(torch, dname)
        init = [t.to(device=device, dtype=dtype) for t in init32]
        grads[dname] = [t.to(device=device, dtype=dtype) for t in grads32]
        for cname, (_, factory) in table.items():
            key = (cname, dname)
            params = [torch.nn.Parameter(t.clone()) for t in init]
            for p, g in zip(params, grads[dname]):
                p.grad = g
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opt = factory(params)
                    _sync(device)
                    t0 = time.perf_counter()
                    opt.step()
                    _sync(device)
                    first[key] = time.perf_counter() - t0
            except Exception as exc:  # a peer that does not run here is reported, not fatal
                print(f"skipped on {name} {dname}: {cname} ({type(exc).__name__}: {str(exc)[:120]})")
                continue
            opts[key] = opt
            owned[key] = params
        del init

    def regrad(key: tuple[str, str]) -> None:
        # Some peers (heavyball) consume p.grad and set it to None; give every
        # contender its gradients back before each step, outside the timing.
        for p, g in zip(owned[key], grads[key[1]]):
            p.grad = g

    times: dict[tuple[str, str], list[float]] = {k: [] for k in opts}
    extra: dict[tuple[str, str], float] = {k: 0.0 for k in opts}
    keys = list(opts)
    for _ in range(args.warmup):
        for key in keys:
            regrad(key)
            opts[key].step()
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for key in order:
            regrad(key)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            opts[key].step()
            _sync(device)
            times[key].append(time.perf_counter() - t0)
            if device.type == "cuda":
                # Temporaries the step allocated beyond the live state, in MiB.
                peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                extra[key] = max(extra[key], peak)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for key in keys:
        cname, dname = key
        base = {"adam": med.get(("torch AdamW fused", dname)), "muon": med.get(("torch Muon + AdamW", dname))}
        sgd_bases = [med[k] for k in (("torch SGD-m fused", dname), ("torch SGD-m foreach", dname)) if k in med]
        base["sgd"] = min(sgd_bases) if sgd_bases else None
        group = table[cname][0]
        ratio = med[key] / base[group] if base[group] else float("nan")
        rows.append((cname, dname, group, med[key] * 1e3, ratio, first[key], extra[key]))
    del opts
    gc.collect()
    return rows


def main(argv: list[str] | None = None) -> dict[tuple[str, str, str], float]:
    """Runs the benchmark and prints its tables; returns the ratios by (layout, contender, dtype)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every contender (default 2)")
    parser.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS, choices=list(LAYOUTS),
                        help=f"default: {' '.join(DEFAULT_LAYOUTS)}")
    parser.add_argument("--rounds", type=int, default=30, help="timed interleaved rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds after the first step (default 3)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "float64", "bfloat16", "float16"],
                        help="parameter dtypes, all timed in the same rounds (default: float32 bfloat16)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--no-heavyball", dest="heavyball", action="store_false",
                        help="skip heavyball (its torch.compile first step takes minutes on CPU)")
    parser.add_argument("--foreach-too", action="store_true", help="also time sfoptim with fused=False")
    parser.add_argument("--only", nargs="+", help="keep only contenders whose name contains one of these (torch baselines always kept)")
    parser.add_argument("--warm-cache", action="store_true", help="reuse the user's sfoptim kernel cache")
    parser.add_argument("--muon", action="store_true",
                        help="also time sfoptim.MuonScheduleFree against torch.optim.Muon + AdamW (gpt layout)")
    parser.add_argument("--gpt-width", type=int, default=768,
                        help="model width of the gpt layout (default 768; bfloat16 matrix products are slow on most CPUs)")
    args = parser.parse_args(argv)
    LAYOUTS["gpt"] = _gpt_like(args.gpt_width)

    if not args.warm_cache:
        os.environ["SFOPTIM_CACHE_DIR"] = tempfile.mkdtemp(prefix="sfoptim-bench-")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"dtypes {' '.join(args.dtype)}, rounds {args.rounds} (median), python {sys.version.split()[0]}")
    results = {name: run_layout(name, args, device) for name in args.layouts}
    cnames = list(dict.fromkeys(row[0] for rows in results.values() for row in rows))
    lookup = {(lay, row[0], row[1]): row for lay, rows in results.items() for row in rows}
    columns = [(lay, d) for lay in args.layouts for d in args.dtype]
    width = max(len(c) for c in cnames) + 2
    header = "".ljust(width) + "".join(f"{lay + ' ' + d:>24}" for lay, d in columns)

    def table(cell: Callable[[tuple], str]) -> None:
        print(header)
        for c in cnames:
            print(c.ljust(width) + "".join((cell(lookup[(lay, c, d)]) if (lay, c, d) in lookup else "-").rjust(24)
                                            for lay, d in columns))

    print("\nratio of median step time to baseline on parameters of the same dtype (adam: torch AdamW fused; "
          "sgd: fastest torch SGD-momentum" + ("; muon: torch Muon + AdamW)" if args.muon else ")"))
    table(lambda row: f"{row[4]:6.2f}x ({row[3]:7.1f} ms)")
    print("\nfirst step (s), including state allocation and any compilation")
    table(lambda row: f"{row[5]:.3f}")
    if device.type == "cuda":
        print("\npeak extra CUDA memory during a step (MiB)")
        table(lambda row: f"{row[6]:.1f}")
    return {key: row[4] for key, row in lookup.items()}

if __name__ == "__main__":
    main()
