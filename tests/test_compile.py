"""``torch.compile`` of a function that calls ``optimizer.step()``, as torch's tutorial compiles one.

A 30-step run with a 10-step warmup, a learning-rate change and an
``eval()``/``train()`` switch must settle on its graphs by step 5 (the
schedule's changing numbers must not be guarded on), break the graph no more
often than ``torch.optim.AdamW`` does in the same run, and give eager's
results. Master copies (``state_dtype``) and the wrapper, whose base
optimizer steps eagerly, must give eager's results too.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import sfoptim

STEPS = 30
SETTLED = 5

CASES = {
    "adamw": lambda p, **kw: sfoptim.AdamWScheduleFree(p, lr=0.01, warmup_steps=10, weight_decay=0.01, **kw),
    "sgd": lambda p, **kw: sfoptim.SGDScheduleFree(p, lr=0.05, warmup_steps=10, **kw),
    "radam": lambda p, **kw: sfoptim.RAdamScheduleFree(p, lr=0.01, **kw),
    # the weight-decay options: AdamC scales the kernel's decay scalar; decay at z runs foreach
    "adamw_adamc": lambda p, **kw: sfoptim.AdamWScheduleFree(
        [{"params": list(p), "adamc": True}], lr=0.01, warmup_steps=10, weight_decay=0.1, **kw
    ),
    "adamw_decay_at_z": lambda p, **kw: sfoptim.AdamWScheduleFree(
        [{"params": list(p), "decay_at": "z", "adamc": True}], lr=0.01, warmup_steps=10, weight_decay=0.1, **kw
    ),
    "wrapper": lambda p, **kw: sfoptim.ScheduleFreeWrapper(torch.optim.Adam(p, lr=0.01), weight_decay_at_y=0.01, **kw),
}


def _run(make, compiled: bool) -> tuple[list[torch.Tensor], list[int], int]:
    """Trains a small model; returns its parameters, the graph count after each step, the graph breaks."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = make(model.parameters())
    xs, ys = torch.randn(16, 6), torch.randn(16, 3)

    def step() -> None:
        opt.step()

    fn = torch.compile(step, fullgraph=False) if compiled else step
    graphs = []
    for i in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        fn()
        if i == 12 and hasattr(opt, "eval"):
            opt.eval()
            with torch.no_grad():
                model(xs)
            opt.train()
        if i == 17:
            for group in opt.param_groups:
                group["lr"] = group["lr"] * 0.5
        graphs.append(counters["stats"]["unique_graphs"])
    if hasattr(opt, "eval"):
        opt.eval()
    return [p.detach().clone() for p in model.parameters()], graphs, sum(counters["graph_break"].values())


@pytest.fixture(scope="module")
def adamw_breaks() -> int:
    _, graphs, breaks = _run(lambda p: torch.optim.AdamW(p, lr=torch.tensor(0.01)), compiled=True)
    assert graphs[-1] == graphs[SETTLED - 1]
    return breaks


@pytest.mark.parametrize(
    "name, flags",
    [
        ("adamw", {}),
        ("adamw", {"fused": False}),
        ("adamw", {"state_dtype": torch.float64}),
        ("wrapper", {}),
        ("adamw_adamc", {}),
        ("adamw_decay_at_z", {}),
        pytest.param("sgd", {}, marks=pytest.mark.slow),
        pytest.param("radam", {}, marks=pytest.mark.slow),
    ],
)
def test_compiled_step_settles_and_matches_eager(name: str, flags: dict, adamw_breaks: int) -> None:
    make = lambda p: CASES[name](p, **flags)  # noqa: E731
    eager, _, _ = _run(make, compiled=False)
    compiled, graphs, breaks = _run(make, compiled=True)
    assert graphs[-1] == graphs[SETTLED - 1], f"new graphs after step {SETTLED}: {graphs}"
    # Like torch.optim's, the step leaves the graph once (its Python
    # bookkeeping), which dynamo counts once per enclosing traced frame.
    assert breaks <= adamw_breaks, (breaks, adamw_breaks)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_cpu_kernel_is_an_operator_in_the_graph() -> None:
    """The C kernel reaches the compiled graph as ``sfoptim::cpu_kernel_step``, not as a graph break."""
    from sfoptim.backends import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("no C compiler for the fused CPU kernel")
    torch._dynamo.reset()
    seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    model = torch.nn.Linear(4, 3)
    opt = sfoptim.AdamWScheduleFree(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    torch.compile(lambda: opt.step(), backend=backend)()
    assert any(t.startswith("sfoptim.cpu_kernel_step") for t in seen), seen


def _run_with_closure(make, compiled: bool) -> tuple[list[torch.Tensor], list[int], set[str]]:
    """``opt.step(closure)`` under ``torch.compile``; returns the parameters, the graph count after each
    step and the distinct reasons for graph breaks."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = make(model.parameters())
    xs, ys = torch.randn(16, 6), torch.randn(16, 3)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xs), ys)
        loss.backward()
        return loss

    def step() -> None:
        opt.step(closure)

    fn = torch.compile(step) if compiled else step
    graphs = []
    for _ in range(STEPS):
        fn()
        graphs.append(counters["stats"]["unique_graphs"])
    if hasattr(opt, "eval"):
        opt.eval()
    # A reason's first two lines name the break and the function that caused it.
    reasons = {"\n".join(reason.split("\n")[:2]) for reason in counters["graph_break"]}
    return [p.detach().clone() for p in model.parameters()], graphs, reasons


@pytest.mark.parametrize("cls", [sfoptim.AdamWScheduleFree, sfoptim.AdamWScheduleFreeClosure])
def test_step_with_a_closure_settles_and_breaks_only_where_torch_adamw_does(cls) -> None:
    # The closure's zero_grad and backward leave the graph in any optimizer;
    # the schedule-free step must add no break of its own, and its warmup
    # must not keep compiling new graphs.
    _, _, torch_reasons = _run_with_closure(lambda p: torch.optim.AdamW(p, lr=0.01), compiled=True)
    eager, _, _ = _run_with_closure(lambda p: cls(p, lr=0.01, warmup_steps=10), compiled=False)
    compiled, graphs, reasons = _run_with_closure(lambda p: cls(p, lr=0.01, warmup_steps=10), compiled=True)
    assert graphs[-1] == graphs[SETTLED - 1], f"new graphs after step {SETTLED}: {graphs}"
    assert reasons <= torch_reasons, reasons - torch_reasons
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
