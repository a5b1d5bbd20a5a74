"""``sfoptim demo``: one schedule-free run against schedules tuned per stopping time.

The demo trains a small MLP on MNIST-1D (generated offline by the ``mnist1d``
package) and compares a *single* schedule-free AdamW run, evaluated at the four
stopping times T/8, T/4, T/2 and T, against AdamW with linear warmup and cosine
decay (and, as a second baseline, linear decay) whose learning rate is tuned on a
small grid separately for each stopping time.  Every baseline run knows its
stopping time in advance; the schedule-free run does not.

The reported quantity is the loss on the whole training set (what the optimizer
minimises) together with held-out accuracy, as mean and standard deviation over
seeds.  Results are written as a terminal table, ``results.md``, ``results.json``
and ``frontier.png`` in the output folder.  The task, training loop and tuning
live in :mod:`sfoptim.experiments.mnist1d_mlp`; this module is the command
around them (arguments, progress, reports).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import textwrap
from dataclasses import asdict
from pathlib import Path

import torch

from sfoptim.experiments.mnist1d_mlp import (
    DEFAULT,
    QUICK,
    STOP_FRACTIONS,
    DemoConfig,
    evaluate,
    load_task,
    make_model,
    run_comparison,
    schedule_factor,
    total_steps,
    train_run,
)

# The experiment's names stay importable from here for code written against
# ``sfoptim.demo``; they live in sfoptim.experiments.mnist1d_mlp.
__all__ = [
    "DEFAULT", "QUICK", "STOP_FRACTIONS", "DemoConfig", "build_parser", "evaluate", "load_task", "main",
    "make_model", "run_demo", "schedule_factor", "train_run",
]

#: Widest line the command prints (the tables and the summary).
WIDTH = 100


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------

class _Progress:
    """tqdm when installed, otherwise a plain line every 10 %; silent when disabled."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar = None
        self._next = 0.1
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, unit="step", desc="training", file=sys.stderr)
            except ImportError:
                pass

    def __call__(self, n: int = 1):
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self.done >= self._next * self.total:
            print(f"training: {self.done}/{self.total} steps", file=sys.stderr, flush=True)
            self._next += 0.1

    def close(self):
        if self._bar is not None:
            self._bar.close()


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Run every training run of the demo (``run_comparison``) with an optional progress bar on stderr."""
    bar = _Progress(total_steps(cfg), progress)
    try:
        return run_comparison(cfg, bar)
    finally:
        bar.close()


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

def _fmt(ms, digits=3):
    m, sd = ms
    return f"{m:.{digits}g} ± {sd:.{digits - 1}g}"


def format_table(result, markdown: bool = False) -> str:
    """The comparison table: Markdown (every column in one table, for results.md)
    or aligned text for a terminal, at most 100 columns wide (training loss and
    held-out accuracy as two tables)."""
    baselines = [b for b in ("cosine", "linear") if b in result["rows"][0]]

    def lr(r, b):
        return f"{r[b]['lr']:g}" + ("*" if r[b]["lr_on_grid_edge"] else "")

    if markdown:
        head = ["steps", "schedule-free loss", "schedule-free acc"]
        for b in baselines:
            head += [f"tuned {b} loss", f"{b} lr", f"{b} acc", f"SF/{b}"]
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in result["rows"]:
            line = [str(r["steps"]), _fmt(r["schedulefree"]["loss"]), _fmt(r["schedulefree"]["acc"])]
            for b in baselines:
                line += [_fmt(r[b]["loss"]), lr(r, b), _fmt(r[b]["acc"]), f"{r[b]['ratio']:.3f}"]
            out.append("| " + " | ".join(line) + " |")
        return "\n".join(out)

    loss_head = ["steps", "schedule-free"]
    acc_head = ["steps", "schedule-free"]
    for b in baselines:
        loss_head += [f"tuned {b}", "lr", f"SF/{b[:3]}"]
        acc_head += [f"tuned {b}"]
    loss_body, acc_body = [], []
    for r in result["rows"]:
        loss_line = [str(r["steps"]), _fmt(r["schedulefree"]["loss"])]
        acc_line = [str(r["steps"]), _fmt(r["schedulefree"]["acc"])]
        for b in baselines:
            loss_line += [_fmt(r[b]["loss"]), lr(r, b), f"{r[b]['ratio']:.3f}"]
            acc_line += [_fmt(r[b]["acc"])]
        loss_body.append(loss_line)
        acc_body.append(acc_line)
    return "\n".join(["training loss on the whole training set (mean ± sd over seeds):"]
                     + _aligned(loss_head, loss_body)
                     + ["", "held-out accuracy (baselines tuned for training loss):"]
                     + _aligned(acc_head, acc_body))


def _aligned(head, body):
    """Right-aligned text columns separated by two spaces, with a rule under the header."""
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in body]


def _verdict(result) -> str:
    ratios = [r["cosine"]["ratio"] for r in result["rows"]]
    wins = sum(x <= 1.0 for x in ratios)
    return (f"schedule-free training loss is no worse than tuned cosine at {wins} of "
            f"{len(ratios)} stopping times (SF/cosine ratios: "
            + ", ".join(f"{x:.3f}" for x in ratios) + ")")


def _tuned_end_points(ax, result, metric: str, label: str) -> None:
    """Marks each tuned baseline's ``metric`` (mean ± sd) at its stopping times."""
    hs = [r["steps"] for r in result["rows"]]
    for b, color, marker in (("cosine", "C3", "o"), ("linear", "C2", "s")):
        if b not in result["rows"][0]:
            continue
        m = [r[b][metric][0] for r in result["rows"]]
        sd = [r[b][metric][1] for r in result["rows"]]
        ax.errorbar(hs, m, yerr=sd, color=color, marker=marker, ls="--", capsize=3, label=label.format(b))


def plot(result, path: Path) -> bool:
    """Write the frontier plot; return False when matplotlib is unavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curve = result["schedulefree_curve"]
    steps = curve["steps"]
    per_seed = curve["loss"]
    mean = [statistics.fmean(v) for v in zip(*per_seed)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for _i, losses in enumerate(per_seed):
        ax.plot(steps, losses, color="C0", alpha=0.25, lw=1)
    ax.plot(steps, mean, color="C0", lw=2,
            label=f"schedule-free AdamW, one run (lr {result['config']['sf_lr']:g})")
    hs = [r["steps"] for r in result["rows"]]
    _tuned_end_points(ax, result, "loss", "warmup + {} decay, lr tuned per stopping time")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("steps")
    ax.set_ylabel("training loss (whole training set)")
    n = len(result["config"]["seeds"])
    fig.suptitle(f"MNIST-1D MLP: one schedule-free run vs schedules tuned per stopping time "
                 f"(mean over {n} seed{'s' * (n > 1)})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    # Held-out accuracy beside it: a lower training loss is not automatically a
    # better model, and the reader should see both.
    acc_mean = [statistics.fmean(v) for v in zip(*curve["acc"])]
    ax2.plot(steps, acc_mean, color="C0", lw=2, label="schedule-free AdamW, one run")
    _tuned_end_points(ax2, result, "acc", "{}, tuned for training loss per stopping time")
    ax2.set_xscale("log")
    ax2.set_xlabel("steps")
    ax2.set_ylabel("held-out accuracy")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    from matplotlib.ticker import NullFormatter

    for a in (ax, ax2):
        # Label exactly the four stopping times; log-axis minor labels collide.
        a.set_xticks(hs, [str(h) for h in hs])
        a.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(result, out: Path):
    """Write results.json, results.md and (when possible) frontier.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    cfg = result["config"]
    md = [
        f"# sfoptim demo ({cfg['label']})",
        "",
        f"{result['task']}; {cfg['steps']} steps, batch {cfg['batch_size']}, "
        f"seeds {cfg['seeds']}; torch {result['torch']}, {result['threads']} thread(s), "
        f"{result['seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU.",
        "",
        "Loss is on the whole training set; accuracy on held-out data; mean ± sd over seeds.",
        f"Baselines: AdamW, linear warmup over {cfg['warmup_frac']:.0%} of the run, then decay to 0, "
        f"learning rate tuned per stopping time over {cfg['grid']} "
        "(* = best on the grid's edge).",
        "",
        format_table(result, markdown=True),
        "",
        _verdict(result) + ".",
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    return plot(result, out / "frontier.png")


def _positive(kind, minimum=None):
    """An argparse ``type`` accepting finite numbers > 0 (and >= ``minimum``)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not (isinstance(value, int) or math.isfinite(value)) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive {'integer' if kind is int else 'number'}, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The options of ``sfoptim demo``; every value is checked here, before any training."""
    p = argparse.ArgumentParser(
        prog="sfoptim demo",
        description="Train one schedule-free AdamW run on MNIST-1D and compare it, at "
                    "T/8, T/4, T/2 and T, with AdamW + warmup + cosine (and linear) decay "
                    "tuned separately for each stopping time.",
    )
    p.add_argument("--quick", action="store_true",
                   help=f"small run (under a minute): {QUICK.steps} steps, {len(QUICK.seeds)} seed, "
                        f"{QUICK.num_samples} samples")
    p.add_argument("--out", default="sfoptim-demo",
                   help="output folder, created if needed; checked for writing before training "
                        "(default: %(default)s)")
    # T/8 must be at least one step, so that the four stopping times differ.
    p.add_argument("--steps", type=_positive(int, minimum=8), metavar="T",
                   help=f"horizon T in steps, at least 8 (default: {DEFAULT.steps}; {QUICK.steps} with --quick)")
    p.add_argument("--seeds", type=_positive(int), metavar="N",
                   help=f"number of seeds (default: {len(DEFAULT.seeds)}; {len(QUICK.seeds)} with --quick)")
    p.add_argument("--lr", type=_positive(float),
                   help=f"schedule-free learning rate (default: {DEFAULT.sf_lr:g})")
    # One thread is the sensible default for a model this small: on two shared
    # cores, two threads made each step several times slower (synchronisation
    # costs more than the tiny matrix products gain).
    p.add_argument("--threads", type=_positive(int), default=1,
                   help="torch threads, capped at the number of CPUs (default: %(default)s)")
    p.add_argument("--no-linear", action="store_true", help="skip the linear-decay baseline")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown only when stderr is a terminal)")
    return p


def _writable_folder(p: argparse.ArgumentParser, folder: str) -> Path:
    """Create ``folder`` and write a file in it now, so a bad ``--out`` fails before training."""
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".sfoptim-demo-write-test"):
            pass
    except OSError as exc:
        p.error(f"argument --out: cannot write to {str(out)!r}: {exc.strerror or exc}")
    return out


def main(argv=None) -> int:
    """Entry point of ``sfoptim demo``."""
    p = build_parser()
    a = p.parse_args(argv)
    out = _writable_folder(p, a.out)

    cfg = DemoConfig(**asdict(QUICK if a.quick else DEFAULT))
    if a.steps is not None:
        cfg.steps = a.steps
    if a.seeds is not None:
        cfg.seeds = tuple(range(a.seeds))
    if a.lr is not None:
        cfg.sf_lr = a.lr
    if a.no_linear:
        cfg.linear_decay = False
    cfg.threads = min(a.threads, os.cpu_count() or 1)
    torch.set_num_threads(cfg.threads)

    # A bar redirected to a file or pipe is thousands of carriage-return lines.
    result = run_demo(cfg, progress=not a.no_progress and sys.stderr.isatty())
    plotted = write_outputs(result, out)
    print()
    print(format_table(result))
    print()
    print(textwrap.fill(_verdict(result) + ".", WIDTH))
    print(textwrap.fill("(SF/cos, SF/lin: schedule-free loss / tuned baseline loss; "
                        f"* = tuned lr on the edge of the grid {', '.join(f'{x:g}' for x in cfg.grid)})", WIDTH))
    print("wrote:")
    for name in ("results.md", "results.json") + (("frontier.png",) if plotted else ()):
        print(f"  {out / name}")
    if not plotted:
        print("(install matplotlib for the plot)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
