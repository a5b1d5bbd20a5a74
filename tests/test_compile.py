"""``torch.compile`` of a function that calls ``optimizer.step()``, as torch's tutorial compiles one.

A 30-step run of every registry entry marked ``compile`` (with its warmup), a learning-rate change and an
``eval()``/``train()`` switch must settle on its graphs by step 5 (the
schedule's changing numbers must not be guarded on), break the graph no more
often than ``torch.optim.AdamW`` does in the same run, and give eager's
results. Master copies (``state_dtype``) and the wrapper, whose base
optimizer steps eagerly, must give eager's results too.
"""

from __future__ import annotations

from typing import Any

import pytest
import registry
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import sfoptim

STEPS = 30
SETTLED = 5

#: The weight-decay options as group keys: AdamC scales the kernel's decay scalar; decay at z runs foreach.
DECAY_OPTIONS = {"adamc": {"adamc": True}, "decay_at_z": {"decay_at": "z", "adamc": True}}
#: Quick by default; the other compile entries of the registry run with -m slow.
QUICK = ("adamw", "adamw_closure", "wrapper_adam")


def _maker(name: str, flags: dict, options: dict | None = None) -> Any:
    info = registry.BY_NAME[name]
    if options is None:
        return lambda p: info.make(p, **flags)
    return lambda p: info.make([{"params": list(p), **options}], **flags)


def _cases(variants: list[tuple[str, dict, dict | None]], **wanted: bool) -> list[Any]:
    """Every compile entry of the registry with the ``wanted`` capabilities (the slow ones marked), then ``variants`` of AdamW."""
    cases = [
        pytest.param(info.name, {}, None, marks=() if info.name in QUICK else pytest.mark.slow, id=info.name)
        for info in registry.select(compile=True, **wanted)
    ]
    return cases + [pytest.param("adamw", flags, opt, id=f"adamw-{key}") for key, flags, opt in variants]


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
    "name, flags, options",
    _cases(
        [
            ("foreach", {"fused": False}, None),
            ("state_dtype", {"state_dtype": torch.float64}, None),
            ("adamc", {"weight_decay": 0.1}, DECAY_OPTIONS["adamc"]),
            ("decay_at_z", {"weight_decay": 0.1}, DECAY_OPTIONS["decay_at_z"]),
        ],
        closure=False,
    ),
)
def test_compiled_step_settles_and_matches_eager(name: str, flags: dict, options: dict | None, adamw_breaks: int) -> None:
    make = _maker(name, flags, options)
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


@pytest.mark.parametrize("name, flags, options", _cases([]))
def test_step_with_a_closure_settles_and_breaks_only_where_torch_adamw_does(
    name: str, flags: dict, options: dict | None
) -> None:
    # The closure's zero_grad and backward leave the graph in any optimizer;
    # the schedule-free step must add no break of its own, and its warmup
    # must not keep compiling new graphs.
    _, _, torch_reasons = _run_with_closure(lambda p: torch.optim.AdamW(p, lr=0.01), compiled=True)
    eager, _, _ = _run_with_closure(_maker(name, flags, options), compiled=False)
    compiled, graphs, reasons = _run_with_closure(_maker(name, flags, options), compiled=True)
    assert graphs[-1] == graphs[SETTLED - 1], f"new graphs after step {SETTLED}: {graphs}"
    assert reasons <= torch_reasons, reasons - torch_reasons
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
