"""``sfoptim demo``: one schedule-free run against schedules tuned per stopping time.

The demo trains a small MLP on MNIST-1D (generated offline by the ``mnist1d``
package) and compares schedule-free optimizers, evaluated at the four stopping
times T/8, T/4, T/2 and T of a single run, against AdamW with linear warmup and
cosine decay, whose every run knows its stopping time in advance.  Schedule-free
AdamW and AdamW + cosine get the same grid of learning rates and weight decays;
schedule-free AdamW keeps one configuration for all stopping times while cosine
is tuned for each one, both by held-out accuracy.  Optimizers that need no
learning rate run once with their defaults.

The reported quantities are held-out accuracy (the metric every choice is made
by) and the loss on the whole training set (what the optimizer minimises), as
mean and standard deviation over seeds.  Results are written as a terminal
table, ``results.md``, ``results.json`` and ``frontier.png`` in the output
folder.  The task, training loop, method table and tuning live in
:mod:`sfoptim.experiments.mnist1d_mlp`; this module is the command around them
(arguments, progress, reports).
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
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sfoptim.experiments.methods import Method
from sfoptim.experiments.mnist1d_mlp import (
    DEFAULT,
    DEFAULT_METHODS,
    QUICK,
    STOP_FRACTIONS,
    DemoConfig,
    demo_methods,
    evaluate,
    load_task,
    make_model,
    run_comparison,
    schedule_factor,
    total_steps,
    train_method,
    train_run,
)

# The experiment's names stay importable from here for code written against
# ``sfoptim.demo``; they live in sfoptim.experiments.mnist1d_mlp.
__all__ = [
    "DEFAULT", "DEFAULT_METHODS", "QUICK", "STOP_FRACTIONS", "DemoConfig", "build_parser", "demo_methods",
    "evaluate", "load_task", "main", "make_model", "run_demo", "schedule_factor", "train_method", "train_run",
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


def run_demo(cfg: DemoConfig, methods: list[Method], progress: bool = True) -> dict:
    """Run every training run of the demo (``run_comparison``) with an optional progress bar on stderr."""
    bar = _Progress(total_steps(cfg, methods), progress)
    try:
        return run_comparison(cfg, bar, methods)
    finally:
        bar.close()


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

def _fmt(ms, digits=3, spread=True):
    """``mean ± sd``, or the mean alone where there is no spread to show (one seed)."""
    m, sd = ms
    return f"{m:.{digits}g} ± {sd:.{digits - 1}g}" if spread else f"{m:.{digits}g}"


def _over_seeds(n: int) -> str:
    return f"mean ± sd over {n} seeds" if n > 1 else "1 seed"


def _config(config: dict, edge=()) -> str:
    if not config:
        return "defaults"
    return " ".join(f"{'wd' if k == 'weight_decay' else k} {v:g}{'*' * (k in edge)}" for k, v in config.items())


def _choices(result, name) -> str:
    """The configuration ``name`` used: one for all stopping times, or one per stopping time."""
    rows = result["rows"]
    picks = [_config(r[name]["config"], r[name]["on_grid_edge"]) for r in rows]
    if result["methods"][name]["schedule"] is None:
        return picks[0]
    return "; ".join(f"{r['steps']}: {c}" for r, c in zip(rows, picks))


def _metric_rows(result, metric):
    spread = len(result["config"]["seeds"]) > 1
    return [[m["label"]] + [_fmt(r[name][metric], spread=spread) for r in result["rows"]]
            for name, m in result["methods"].items()]


def format_table(result, markdown: bool = False) -> str:
    """Held-out accuracy and training loss per method and stopping time, then
    each method's tuning budget and choice: Markdown (for results.md) or
    aligned text at most 100 columns wide (for a terminal)."""
    n = len(result["config"]["seeds"])
    head = ["method"] + [str(r["steps"]) for r in result["rows"]]
    acc, loss = _metric_rows(result, "acc"), _metric_rows(result, "loss")
    tuning = [(m["label"], m["tuning"], _choices(result, name)) for name, m in result["methods"].items()]
    if markdown:
        def md(h, body):
            return ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)] + ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(
            [f"Held-out accuracy ({_over_seeds(n)}), by stopping time:", ""]
            + md(head, acc)
            + ["", "Training loss on the whole training set, by stopping time:", ""]
            + md(head, loss)
            + ["", "Tuning budget and the configuration chosen (by held-out accuracy):", ""]
            + md(["method", "budget", "chosen"], [list(t) for t in tuning]))
    lines = [f"held-out accuracy ({_over_seeds(n)}), by stopping time:"]
    lines += _aligned(head, acc)
    lines += ["", "training loss on the whole training set:"] + _aligned(head, loss)
    lines += ["", "tuning budget; configuration chosen by held-out accuracy (* = on the grid's edge):"]
    for label, budget, chosen in tuning:
        lines += textwrap.wrap(f"{label}: {budget}; chosen: {chosen}", WIDTH, subsequent_indent="    ")
    return "\n".join(lines)


def _aligned(head, body):
    """Right-aligned text columns separated by two spaces, with a rule under the header."""
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in body]


def _verdict(result) -> str:
    """Each method's held-out accuracy against tuned AdamW + cosine, stopping time by stopping time."""
    ref = result["reference"]
    if ref is None:
        return "(no AdamW + cosine run to compare with)"
    parts = []
    for name, m in result["methods"].items():
        if name == ref:
            continue
        diffs = [r[name]["acc_diff"] for r in result["rows"]]
        parts.append(f"{m['label']} {', '.join(f'{d:+.3f}' for d in diffs)}")
    return ("held-out accuracy minus that of AdamW + cosine tuned for each stopping time: "
            + "; ".join(parts))


#: A loss curve that rises above this multiple of its first value has diverged.
DIVERGED_FACTOR = 10.0


def _diverged(losses) -> bool:
    """Whether a loss curve diverged: a value that is not finite, or one far above where it started."""
    return not all(math.isfinite(v) for v in losses) or max(losses) > DIVERGED_FACTOR * losses[0]


def plot(result, path: Path) -> bool:
    """Write the frontier plot (:func:`frontier_figure`); return False when matplotlib is unavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = frontier_figure(result)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def frontier_figure(result):
    """The frontier plot as a matplotlib figure: held-out accuracy and training loss against steps.

    The legend sits below the panels. A method whose training loss diverges is
    marked so in the legend and where it leaves the loss panel, whose range is
    that of the other methods.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 5.2))
    hs = [r["steps"] for r in result["rows"]]
    markers = "osD^v<>"
    losses = {}  # name -> (steps, mean training loss)
    for name in result["methods"]:
        curve = result["curves"].get(name)
        if curve is not None:
            losses[name] = (curve["steps"], [statistics.fmean(v) for v in zip(*curve["loss"])])
        else:
            losses[name] = (hs, [r[name]["loss"][0] for r in result["rows"]])
    diverged = {name for name, (_, ys) in losses.items() if _diverged(ys)}
    for i, (name, m) in enumerate(result["methods"].items()):
        color = f"C{i}"
        curve = result["curves"].get(name)
        note = " (diverges)" if name in diverged else ""
        for ax, metric in ((ax_acc, "acc"), (ax_loss, "loss")):
            if curve is not None:
                # One run, never told when it stops: a curve, best configuration.
                mean = [statistics.fmean(v) for v in zip(*curve[metric])]
                ax.plot(curve["steps"], mean, color=color, lw=2, label=f"{m['label']}, one run{note}")
            else:
                ax.errorbar(hs, [r[name][metric][0] for r in result["rows"]],
                            yerr=[r[name][metric][1] for r in result["rows"]], color=color,
                            marker=markers[i % len(markers)], ls="--", capsize=3,
                            label=f"{m['label']}, tuned per stopping time{note}")
    for ax in (ax_acc, ax_loss):
        ax.set_xscale("log")
        ax.set_xlabel("steps")
        ax.grid(True, which="both", alpha=0.3)
        # Label exactly the four stopping times; log-axis minor labels collide.
        ax.set_xticks(hs, [str(h) for h in hs])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax_acc.set_ylabel("held-out accuracy")
    accs = [r[name]["acc"][0] for r in result["rows"] for name in result["methods"]]
    ax_acc.set_ylim(max(0.0, min(accs) - 0.1), min(1.0, max(accs) + 0.03))
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss (whole training set)")
    kept = [y for name, (_, ys) in losses.items() if name not in diverged for y in ys if math.isfinite(y) and y > 0]
    if diverged and kept:
        # A diverging run would stretch the axis over decades the others never reach.
        top = max(kept) * 3
        ax_loss.set_ylim(min(kept) / 1.5, top)
        for i, name in enumerate(result["methods"]):
            if name in diverged:
                steps, ys = losses[name]
                leaves = next(x for x, y in zip(steps, ys) if not (math.isfinite(y) and y <= top))
                ax_loss.plot([leaves], [top], marker="^", ms=9, color=f"C{i}", clip_on=False, zorder=5)
                ax_loss.annotate(f"{result['methods'][name]['label']} diverges", (leaves, top), xytext=(-8, -14),
                                 textcoords="offset points", ha="right", color=f"C{i}", fontsize=8)
    handles, labels = ax_acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    n = len(result["config"]["seeds"])
    fig.suptitle(f"MNIST-1D MLP: schedule-free runs vs AdamW + cosine tuned per stopping time "
                 f"({'mean over ' + str(n) + ' seeds' if n > 1 else '1 seed'})")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def write_outputs(result, out: Path):
    """Write results.json, results.md and (when possible) frontier.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    cfg = result["config"]
    md = [
        f"# sfoptim demo ({cfg['label']})",
        "",
        f"{result['task']}; {cfg['steps']} steps, batch {cfg['batch_size']}, "
        f"seeds {cfg['seeds']}; torch {result['torch']}, {result['threads']} thread(s). "
        f"Training and evaluation took {result['seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU "
        "(start-up, making the data set and writing these files not included).",
        "",
        "Accuracy on held-out data; loss on the whole training set; "
        f"{'mean ± sd over seeds' if len(cfg['seeds']) > 1 else 'one seed'}. "
        "A schedule-free run is never told its stopping time and keeps one configuration "
        "(best held-out accuracy averaged over the stopping times); a decay schedule "
        f"(linear warmup over {cfg['warmup_frac']:.0%} of the run, then decay to 0) is tuned "
        "for each stopping time (best held-out accuracy there). * = best on the grid's edge.",
        "",
        format_table(result, markdown=True),
        "",
        _verdict(result) + ".",
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    return plot(result, out / "frontier.png")


def _positive(kind, minimum=None, allow_zero=False):
    """An argparse ``type`` accepting finite numbers > 0 (>= 0 with ``allow_zero``; >= ``minimum``)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not (isinstance(value, int) or math.isfinite(value)) or value < 0 or (value == 0 and not allow_zero):
            what = "non-negative" if allow_zero else "positive"
            raise argparse.ArgumentTypeError(f"must be a {what} {'integer' if kind is int else 'number'}, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The options of ``sfoptim demo``; every value is checked here, before any training."""
    table = demo_methods(DEFAULT)
    width = max(map(len, table))
    listing = "\n".join(f"  {name:<{width}} {m.label}: {m.tuning()}" + (" [default]" if name in DEFAULT_METHODS else "")
                        for name, m in table.items())
    p = argparse.ArgumentParser(
        prog="sfoptim demo",
        description="Train schedule-free optimizers on MNIST-1D and compare them, at "
                    "T/8, T/4, T/2 and T, with AdamW + warmup + cosine decay tuned separately "
                    "for each stopping time. Schedule-free AdamW and the decay schedules share "
                    "one grid (--lrs x --weight-decays); schedule-free AdamW keeps one "
                    "configuration for all stopping times (best held-out accuracy averaged over "
                    "them), a decay schedule takes the best for each stopping time.",
        epilog="methods:\n" + listing + "\n(default: those of the [default] ones that this "
               "sfoptim has)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help=f"small run (under a minute): {QUICK.steps} steps, {len(QUICK.seeds)} seed, "
                        f"{QUICK.num_samples} samples, a {len(QUICK.lrs) * len(QUICK.weight_decays)}-point grid")
    p.add_argument("--out", default="sfoptim-demo",
                   help="output folder, created if needed; checked for writing before training "
                        "(default: %(default)s)")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="methods to run, by name (listed below)")
    # T/8 must be at least one step, so that the four stopping times differ.
    p.add_argument("--steps", type=_positive(int, minimum=8), metavar="T",
                   help=f"horizon T in steps, at least 8 (default: {DEFAULT.steps}; {QUICK.steps} with --quick)")
    p.add_argument("--seeds", type=_positive(int), metavar="N",
                   help=f"number of seeds (default: {len(DEFAULT.seeds)}; {len(QUICK.seeds)} with --quick)")
    p.add_argument("--lrs", type=_positive(float), nargs="+", metavar="LR",
                   help="learning rates of the shared grid (default: "
                        f"{' '.join(f'{x:g}' for x in DEFAULT.lrs)}; "
                        f"{' '.join(f'{x:g}' for x in QUICK.lrs)} with --quick)")
    p.add_argument("--weight-decays", type=_positive(float, allow_zero=True), nargs="+", metavar="WD",
                   help="weight decays of the shared grid (default: "
                        f"{' '.join(f'{x:g}' for x in DEFAULT.weight_decays)}; "
                        f"{' '.join(f'{x:g}' for x in QUICK.weight_decays)} with --quick)")
    # One thread is the sensible default for a model this small: on two shared
    # cores, two threads made each step several times slower (synchronisation
    # costs more than the tiny matrix products gain).
    p.add_argument("--threads", type=_positive(int), default=1,
                   help="torch threads, capped at the number of CPUs (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown only when stderr is a terminal)")
    return p


def _methods(p: argparse.ArgumentParser, names, cfg: DemoConfig) -> list[Method]:
    """The named methods, or the available defaults; an unknown or unavailable name is a usage error."""
    table = demo_methods(cfg)
    if names is None:
        return [table[n] for n in DEFAULT_METHODS if table[n].available() is None]
    out = []
    for name in dict.fromkeys(names):  # in the order given, once each
        if name not in table:
            p.error(f"argument --methods: unknown method {name!r} (choose from {', '.join(table)})")
        why = table[name].available()
        if why is not None:
            p.error(f"argument --methods: {name!r} cannot run here: {why}")
        out.append(table[name])
    return out


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


def _seconds_since_start(fallback: float) -> float:
    """Wall time since this process started (Linux), else since ``fallback`` (a ``perf_counter`` value)."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - fallback


def main(argv=None) -> int:
    """Entry point of ``sfoptim demo``."""
    entered = time.perf_counter()
    p = build_parser()
    a = p.parse_args(argv)

    cfg = DemoConfig(**asdict(QUICK if a.quick else DEFAULT))
    if a.steps is not None:
        cfg.steps = a.steps
    if a.seeds is not None:
        cfg.seeds = tuple(range(a.seeds))
    if a.lrs is not None:
        cfg.lrs = tuple(a.lrs)
    if a.weight_decays is not None:
        cfg.weight_decays = tuple(a.weight_decays)
    methods = _methods(p, a.methods, cfg)
    out = _writable_folder(p, a.out)
    cfg.threads = min(a.threads, os.cpu_count() or 1)
    torch.set_num_threads(cfg.threads)

    # A bar redirected to a file or pipe is thousands of carriage-return lines.
    result = run_demo(cfg, methods, progress=not a.no_progress and sys.stderr.isatty())
    plotted = write_outputs(result, out)
    print()
    print(format_table(result))
    print()
    print(textwrap.fill(_verdict(result) + ".", WIDTH))
    print("wrote:")
    for name in ("results.md", "results.json") + (("frontier.png",) if plotted else ()):
        print(f"  {out / name}")
    if not plotted:
        print("(install matplotlib for the plot)")
    print(
        f"took {_seconds_since_start(entered):.0f} s wall from start-up to the files written, "
        f"{result['seconds']:.0f} s of it training and evaluation"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
