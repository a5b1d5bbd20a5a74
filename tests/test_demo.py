"""End-to-end check of ``sfoptim demo --quick`` and the demo's determinism."""

import json
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("mnist1d", reason="the demo extra (pip install 'sfoptim[demo]') is not installed")


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _numbers(v)


def test_demo_quick_writes_finite_results(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "sfoptim.cli", "demo", "--quick", "--out", str(out), "--threads", "1"],
        capture_output=True, text=True, timeout=900,  # a hang guard: minutes on a loaded machine
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy" in proc.stdout and "training loss" in proc.stdout
    # stderr is a pipe here, not a terminal: no progress bar in it.
    assert "training" not in proc.stderr and "\r" not in proc.stderr, proc.stderr[-500:]
    wide = [line for line in proc.stdout.splitlines() if len(line) > 100]
    assert not wide, wide
    assert "±" not in proc.stdout  # one seed: no spread to show
    assert proc.stdout.splitlines()[-1].startswith("took ") and "s wall from start-up to the files written" in proc.stdout

    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert [r["steps"] for r in rows] == [50, 100, 200, 400]
    assert {"sf-adamw", "adamw-cosine"} <= set(result["methods"])
    for r in rows:
        for method in result["methods"]:
            loss_mean, loss_sd = r[method]["loss"]
            acc_mean, _ = r[method]["acc"]
            assert math.isfinite(loss_mean) and loss_mean > 0 and loss_sd >= 0
            assert 0.0 <= acc_mean <= 1.0
        assert r["sf-adamw"]["loss_ratio"] > 0
    assert all(math.isfinite(x) for x in _numbers(result))

    md = (out / "results.md").read_text()
    assert "| method |" in md and "Held-out accuracy" in md and "Tuning budget" in md
    png = out / "frontier.png"
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schedule_free_and_cosine_get_the_same_grid():
    from sfoptim import demo

    for cfg in (demo.DEFAULT, demo.QUICK):
        table = demo.demo_methods(cfg)
        assert table["sf-adamw"].grid == table["adamw-cosine"].grid
        assert len(table["sf-adamw"].grid) == len(cfg.lrs) * len(cfg.weight_decays)
    assert len(demo.DEFAULT.lrs) * len(demo.DEFAULT.weight_decays) == 6


def test_one_run_keeps_one_config_and_schedules_are_tuned_per_stopping_time():
    import statistics

    import torch

    from sfoptim import demo

    torch.set_num_threads(1)
    cfg = demo.DemoConfig(steps=16, seeds=(0,), num_samples=600, hidden=16, sf_warmup=2, curve_points=2,
                          lrs=(0.003, 0.03), weight_decays=(0.1, 1.0))
    table = demo.demo_methods(cfg)
    result = demo.run_comparison(cfg, methods=[table["sf-adamw"], table["adamw-cosine"]])
    rows = result["rows"]
    grid = table["sf-adamw"].grid
    # Schedule-free: the configuration with the best accuracy averaged over all stopping times.
    mean_over_stops = [statistics.fmean(r["sf-adamw"]["grid_acc"][j] for r in rows) for j in range(len(grid))]
    best = grid[max(range(len(grid)), key=mean_over_stops.__getitem__)]
    assert all(r["sf-adamw"]["config"] == best for r in rows)
    # Cosine: the best configuration at each stopping time on its own.
    for r in rows:
        accs = r["adamw-cosine"]["grid_acc"]
        assert r["adamw-cosine"]["config"] == grid[max(range(len(grid)), key=accs.__getitem__)]
        assert r["adamw-cosine"]["acc"][0] == max(accs)


class _LossTakingSGD(torch.optim.SGD):
    """A real optimizer whose step needs the loss (as ScheduleFree+'s does); it records what it gets."""

    def __init__(self, params):
        super().__init__(params, lr=0.01)
        self.losses = []

    def step(self, closure=None, *, loss):
        self.losses.append(float(loss))
        return super().step(closure)

    def train(self):
        pass

    def eval(self):
        pass


def test_method_needing_the_loss_gets_it_every_step():
    from sfoptim import demo
    from sfoptim.experiments.methods import Method

    torch.set_num_threads(1)
    cfg = demo.DemoConfig(steps=12, num_samples=600, hidden=16)
    task = demo.load_task(cfg.num_samples)
    # The demo's ScheduleFree+ entry is such a method; a recording optimizer stands in for it.
    assert demo.demo_methods(cfg)["sf-plus"].needs_loss
    made = []

    def build(model, config):
        made.append(_LossTakingSGD(model.parameters()))
        return made[-1]

    method = Method("loss-taking", "loss-taking SGD", build, schedule_free=True, needs_loss=True)
    demo.train_method(task, cfg, 0, method, {}, 12, [12])
    losses = made[0].losses
    assert len(losses) == 12 and all(math.isfinite(x) and x > 0 for x in losses)
    assert losses[0] == pytest.approx(math.log(10), rel=0.2)  # cross-entropy of a fresh 10-class model


def test_cli_without_command_prints_help():
    proc = subprocess.run([sys.executable, "-m", "sfoptim.cli"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "demo" in proc.stdout


def test_training_is_deterministic_given_seed():
    import torch

    from sfoptim import demo

    torch.set_num_threads(1)
    cfg = demo.DemoConfig(steps=30, num_samples=600, hidden=32, sf_warmup=5)
    task = demo.load_task(cfg.num_samples)
    for method in ("schedulefree", "cosine"):
        a = demo.train_run(task, cfg, 3, method, 0.01, 30, [10, 30])
        b = demo.train_run(task, cfg, 3, method, 0.01, 30, [10, 30])
        assert a == b


def test_schedules_warm_up_and_end_at_zero():
    from sfoptim.demo import schedule_factor

    for kind in ("cosine", "linear"):
        assert schedule_factor(kind, 0, 100, 10) == pytest.approx(0.1)
        assert schedule_factor(kind, 9, 100, 10) == pytest.approx(1.0)
        assert schedule_factor(kind, 99, 100, 10) == pytest.approx(0.0)
        vals = [schedule_factor(kind, s, 100, 10) for s in range(9, 100)]
        assert all(x >= y for x, y in zip(vals, vals[1:]))


def _result(seeds, plus_losses):
    """A demo result of two one-run methods and a tuned schedule, with ScheduleFree+'s loss curve given."""
    steps, hs = [10, 20, 40, 80], [10, 20, 40, 80]
    curves = {
        "sf-adamw": {"steps": steps, "loss": [[2.0, 1.0, 0.5, 0.25]] * len(seeds), "acc": [[0.3, 0.5, 0.6, 0.7]] * len(seeds)},
        "plus": {"steps": steps, "loss": [plus_losses] * len(seeds), "acc": [[0.2, 0.1, 0.1, 0.1]] * len(seeds)},
    }
    methods = {
        "sf-adamw": {"label": "SF AdamW", "tuning": "2 configs", "schedule": None},
        "plus": {"label": "ScheduleFree+", "tuning": "defaults", "schedule": None},
        "adamw-cosine": {"label": "AdamW + cosine", "tuning": "2 configs", "schedule": "cosine"},
    }
    rows = []
    for j, h in enumerate(hs):
        row = {"steps": h}
        for name in ("sf-adamw", "plus"):
            row[name] = {"loss": (curves[name]["loss"][0][j], 0.01), "acc": (curves[name]["acc"][0][j], 0.01),
                         "config": {}, "on_grid_edge": []}
        row["adamw-cosine"] = {"loss": (1.5 - 0.3 * j, 0.01), "acc": (0.3 + 0.1 * j, 0.01), "config": {"lr": 0.01},
                               "on_grid_edge": []}
        rows.append(row)
    return {"config": {"seeds": list(seeds)}, "methods": methods, "rows": rows, "curves": curves}


@pytest.mark.parametrize("seeds", [(0,), (0, 1)], ids=["one_seed", "two_seeds"])
def test_tables_show_a_spread_only_over_several_seeds(seeds):
    from sfoptim.demo import format_table

    for markdown in (False, True):
        table = format_table(_result(seeds, [2.0, 1.5, 1.2, 1.0]), markdown=markdown)
        assert ("±" in table) == (len(seeds) > 1), table
        assert ("1 seed" in table) == (len(seeds) == 1), table


def test_plot_keeps_the_legend_off_the_panels_and_a_diverging_run_off_the_loss_scale():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sfoptim.demo import frontier_figure

    fig = frontier_figure(_result((0,), [2.3, 160.0, 3.0, 6.0e4]))
    try:
        ax_acc, ax_loss = fig.axes
        assert ax_acc.get_legend() is None and ax_loss.get_legend() is None and len(fig.legends) == 1
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "ScheduleFree+, one run (diverges)" in labels and "SF AdamW, one run" in labels
        low, high = ax_loss.get_ylim()
        assert 0.1 <= low <= 0.25 and 2.0 <= high <= 10.0, (low, high)  # the range of the runs that converge
        assert any("ScheduleFree+ diverges" in t.get_text() for t in ax_loss.texts)
    finally:
        plt.close(fig)
    fig = frontier_figure(_result((0,), [2.0, 1.5, 1.2, 1.0]))
    try:
        assert not any("diverges" in t.get_text() for t in fig.legends[0].get_texts())
    finally:
        plt.close(fig)
