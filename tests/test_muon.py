"""Schedule-free Muon: torch's Muon step inside, the parameter split, NorMuon, the wrapper around torch.optim.Muon.

The generic checks (reference in float64, state dicts, modes, backends,
validation) run through ``tests/registry.py``; these are the Muon-specific ones.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.optim._muon import _zeropower_via_newtonschulz

import sfoptim
from sfoptim.directions.muon import newton_schulz

F32, F64 = torch.float32, torch.float64


def fixed_grads(shapes: list[tuple[int, ...]], step: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Gradients that do not depend on the point, so two optimizers see the very same inputs."""
    g = torch.Generator().manual_seed(500 + step)
    return [torch.randn(s, generator=g, dtype=F64).to(dtype) for s in shapes]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
def test_newton_schulz_is_torch_muons_bit_for_bit(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours = newton_schulz(g)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, _zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7))


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
def test_direction_is_torch_muons_update_bit_for_bit_laid_out_as_the_parameter(nesterov):
    """The bf16 direction of a wide and a tall matrix: torch's momentum, iterations and scale to the bit, contiguous."""
    from sfoptim.directions.base import Bucket
    from sfoptim.directions.muon import MuonDirection, adjusted_lr_ratio

    gen = torch.Generator().manual_seed(3)
    shapes = [(48, 80), (80, 48)]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    bufs = [torch.randn(s, generator=gen) for s in shapes]
    old = [b.clone() for b in bufs]
    group = dict(
        momentum=0.95, nesterov=nesterov, ns_dtype=torch.bfloat16, ns_coefficients=(3.4445, -4.7750, 2.0315),
        ns_steps=5, ns_eps=1e-7, normuon=False, normuon_beta2=0.95, adjust_lr_fn="match_rms_adamw",
    )
    params = [torch.zeros(s) for s in shapes]
    bucket = Bucket(params, grads, [torch.zeros(s) for s in shapes], {"momentum_buffer": bufs})
    directions, _ = MuonDirection().foreach(group, 1, bucket, {})
    for d, g, b, b0 in zip(directions, grads, bufs, old):
        moved = b0.lerp(g, 0.05)
        update = g.lerp(moved, 0.95) if nesterov else moved
        o = _zeropower_via_newtonschulz(update, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        assert torch.equal(d, o.float() * adjusted_lr_ratio("match_rms_adamw", *g.shape))
        assert d.is_contiguous(), "a direction laid out across the parameter's layout slows every later pass"
        assert torch.equal(b, moved)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(nesterov=False), dict(adjust_lr_fn="match_rms_adamw"), dict(momentum=0.8, weight_decay=0.1)],
    ids=["original", "no_nesterov", "match_rms_adamw", "momentum_decay"],
)
def test_z_follows_torch_muon_step_for_step(options):
    """With weight decay at z, z moves exactly as torch.optim.Muon moves its parameters (bf16 Newton-Schulz)."""
    shapes = [(12, 7), (7, 12)]
    start = fixed_grads(shapes, -1, F32)
    ours = [nn.Parameter(t.clone()) for t in start]
    theirs = [nn.Parameter(t.clone()) for t in start]
    kw = {"lr": 0.03, "momentum": 0.95, "weight_decay": 0.0, "adjust_lr_fn": None, **options}
    opt = sfoptim.MuonScheduleFree(ours, decay_at="z", ns_dtype=torch.bfloat16, warmup_steps=0, **kw)
    muon = torch.optim.Muon(theirs, **kw)
    for step in range(10):
        for p, q, g in zip(ours, theirs, fixed_grads(shapes, step, F32)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        muon.step()
        for p, q in zip(ours, theirs):
            assert rel(opt.state[p]["z"], q) < 1e-5, f"step {step + 1}"


def test_bfloat16_newton_schulz_stays_close_to_the_reference():
    """bf16 iterations (torch's, and the default on accelerators) against the reference's in float32: close, not equal."""
    shapes = [(12, 7), (5,), (4, 2, 3)]
    a = [nn.Parameter(t) for t in fixed_grads(shapes, -1, F32)]
    b = [nn.Parameter(t.clone()) for t in a]
    opt = sfoptim.MuonScheduleFree(a, lr=0.01, ns_dtype=torch.bfloat16)
    ref = sfoptim.MuonScheduleFreeReference(b, lr=0.01, ns_dtype=F32)
    for step in range(10):
        for p, q, g in zip(a, b, fixed_grads(shapes, step, F32)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert max(rel(p, q) for p, q in zip(a, b)) < 2e-2


def test_float32_matches_reference_loosely():
    shapes = [(12, 7), (5,), (4, 2, 3)]
    a = [nn.Parameter(t) for t in fixed_grads(shapes, -1, F32)]
    b = [nn.Parameter(t.clone()) for t in a]
    kw = dict(lr=0.02, weight_decay=0.05, normuon=True, beta_horizon=3, ns_dtype=None)
    opt, ref = sfoptim.MuonScheduleFree(a, **kw), sfoptim.MuonScheduleFreeReference(b, **kw)
    for step in range(20):
        for p, q, g in zip(a, b, fixed_grads(shapes, step, F32)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert max(rel(p, q) for p, q in zip(a, b)) < 1e-5, f"step {step + 1}"


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(11, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.block = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.lm_head = nn.Linear(6, 11, bias=False)


def test_split_by_shape_and_name():
    model = TinyLM()
    opt = sfoptim.MuonScheduleFree(model.named_parameters(), lr=0.02, adamw_lr=0.003)
    muon, adam = opt.param_groups
    assert muon["use_muon"] and not adam["use_muon"]
    assert muon["param_names"] == ["conv.weight", "block.weight"]
    assert set(adam["param_names"]) == {"embed_tokens.weight", "conv.bias", "block.bias", "norm.weight", "norm.bias", "lm_head.weight"}
    assert (muon["lr"], adam["lr"]) == (0.02, 0.003)
    # Without names only the shape can tell: embedding and head are matrices.
    unnamed = sfoptim.MuonScheduleFree(model.parameters())
    assert len(unnamed.param_groups[0]["params"]) == 4
    ref = sfoptim.MuonScheduleFreeReference(model.named_parameters(), lr=0.02, adamw_lr=0.003)
    assert [len(g["params"]) for g in ref.param_groups] == [2, 6]


class Gpt(nn.Module):
    """Embeddings and a head under names the split must not need: ``tok``, ``pos``, ``fc``."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.pos = nn.Parameter(torch.zeros(5, 6))
        self.attn = nn.ModuleDict({"qkv": nn.Linear(6, 18), "output": nn.ModuleDict({"dense": nn.Linear(6, 6)})})
        self.fc = nn.Linear(6, 11, bias=False)
        if tied:
            self.fc.weight = self.tok.weight


def _split(opt) -> dict[bool, list[str]]:
    return {g["use_muon"]: g["param_names"] for g in opt.param_groups}


def test_split_by_module_type_when_the_model_is_given(caplog):
    """Given the model: nn.Embedding by type, a learned pos by name, the last Linear named fc as the head."""
    import logging

    with caplog.at_level(logging.INFO, logger="sfoptim.directions.muon"):
        opt = sfoptim.MuonScheduleFree(Gpt())
    assert _split(opt)[True] == ["attn.qkv.weight", "attn.output.dense.weight"]
    assert set(_split(opt)[False]) == {"tok.weight", "pos", "attn.qkv.bias", "attn.output.dense.bias", "fc.weight"}
    assert len(caplog.records) == 1
    assert "2 matrices to Muon; to AdamW: embeddings ['pos', 'tok.weight'], heads ['fc.weight']" in caplog.text
    tied = sfoptim.MuonScheduleFree(Gpt(tied=True))
    assert _split(tied)[True] == ["attn.qkv.weight", "attn.output.dense.weight"]
    assert "tok.weight" in _split(tied)[False]
    ref = sfoptim.MuonScheduleFreeReference(Gpt())
    assert [len(g["params"]) for g in ref.param_groups] == [2, 5]


@pytest.mark.parametrize("name", ["emb.weight", "tok_emb.weight", "pos", "transformer.wpe.weight", "pos_embed",
                                  "encoder.embed_tokens.weight", "output.weight", "lm_head.weight", "head.fc.weight"])  # fmt: skip
def test_named_embeddings_and_heads_go_to_adamw(name):
    p = nn.Parameter(torch.zeros(4, 3))
    opt = sfoptim.MuonScheduleFree([(name, p), ("blocks.0.mlp.weight", nn.Parameter(torch.zeros(3, 3)))])
    assert _split(opt) == {True: ["blocks.0.mlp.weight"], False: [name]}


def test_bare_parameters_warn_that_the_split_is_a_guess():
    model = Gpt()
    with pytest.warns(UserWarning, match="5 matrices without names go to Muon") as caught:
        opt = sfoptim.MuonScheduleFree(p for p in model.parameters() if p.ndim == 2)
    assert caught[0].filename == __file__, "the warning points at the caller"
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 5
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sfoptim.MuonScheduleFree(model)
        sfoptim.MuonScheduleFree([{"params": [model.tok.weight], "use_muon": True}, {"params": [model.attn.qkv.bias], "use_muon": False}])


def test_one_learning_rate_serves_both_parts():
    """Defaults: RMS-matched Muon, the AdamW part at the same lr, decay at z and a warmup; adamw_lr overrides."""
    model = TinyLM()
    opt = sfoptim.MuonScheduleFree(model)
    muon, adam = opt.param_groups
    assert muon["lr"] == adam["lr"] == 0.032
    assert (muon["adjust_lr_fn"], muon["weight_decay"], muon["decay_at"], muon["warmup_steps"]) == ("match_rms_adamw", 0.1, "z", 20)
    assert [g["lr"] for g in sfoptim.MuonScheduleFree(model, lr=0.005).param_groups] == [0.005, 0.005]
    assert [g["lr"] for g in sfoptim.MuonScheduleFree(model, lr=0.005, adamw_lr=0.001).param_groups] == [0.005, 0.001]
    explicit = sfoptim.MuonScheduleFree([{"params": [model.block.weight], "use_muon": True},
                                         {"params": [model.block.bias], "use_muon": False}], lr=0.03)  # fmt: skip
    assert [g["lr"] for g in explicit.param_groups] == [0.03, 0.03]
    ref = sfoptim.MuonScheduleFreeReference(model, lr=0.005)
    assert [g["lr"] for g in ref.param_groups] == [0.005, 0.005]
    with pytest.raises(ValueError, match="adamw_lr"):
        sfoptim.MuonScheduleFree(model, adamw_lr=-1.0)


def test_explicit_use_muon_groups_are_kept():
    model = TinyLM()
    opt = sfoptim.MuonScheduleFree([
        {"params": [model.block.weight], "use_muon": True},
        {"params": [model.lm_head.weight], "use_muon": False},
        {"params": [model.embed_tokens.weight], "use_muon": False, "lr": 0.1},
    ], lr=0.02, adamw_lr=0.004)  # fmt: skip
    assert [g["use_muon"] for g in opt.param_groups] == [True, False, False]
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.004, 0.1]
    with pytest.raises(ValueError, match="use_muon"):
        sfoptim.MuonScheduleFree([{"params": [model.block.bias], "use_muon": True}])
    with pytest.raises(ValueError, match="use_muon"):
        sfoptim.MuonScheduleFree([{"params": [model.block.weight], "use_muon": "yes"}])


def test_conv_kernel_is_orthogonalized_as_a_matrix():
    """A conv kernel's step is a multiple of an (approximately) orthogonal out x (in*k) matrix."""
    conv = nn.Conv1d(4, 3, 3)
    opt = sfoptim.MuonScheduleFree([conv.weight], lr=1.0, momentum=0.0, beta=1.0, ns_dtype=F64, ns_steps=30,
                                   ns_coefficients=(1.5, -0.5, 0.0), adjust_lr_fn=None, warmup_steps=0, weight_decay=0.0)  # fmt: skip
    conv.weight.grad = torch.randn_like(conv.weight)
    z0 = conv.weight.detach().clone()
    opt.step()
    step = (z0 - opt.state[conv.weight]["z"]).reshape(3, -1)
    assert torch.allclose(step @ step.T, torch.eye(3), atol=1e-6)


def test_normuon_state_is_per_row_and_round_trips():
    model = TinyLM()
    opt = sfoptim.MuonScheduleFree(model.named_parameters(), normuon=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[model.conv.weight]["normuon_v"].shape == (6, 1)
    assert "normuon_v" not in opt.state[model.embed_tokens.weight]
    again = sfoptim.MuonScheduleFree(model.named_parameters(), normuon=True)
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.state[model.conv.weight]["normuon_v"], opt.state[model.conv.weight]["normuon_v"])
    sd = opt.state_dict()
    sd["state"][0]["normuon_v"] = torch.zeros(6, 6)
    with pytest.raises(ValueError, match="normuon_v"):
        again.load_state_dict(sd)


def test_decay_at_z_and_at_y_differ():
    results = []
    for decay_at in ("z", "y"):
        p = nn.Parameter(torch.ones(4, 3, dtype=F64))
        opt = sfoptim.MuonScheduleFree([p], weight_decay=0.5, decay_at=decay_at, ns_dtype=None, warmup_steps=0)
        for step in range(3):
            p.grad = fixed_grads([(4, 3)], step, F64)[0]
            opt.step()
        results.append(p.detach().clone())
    assert rel(*results) > 1e-6


# ---------------------------------------------------------------- wrapper
def test_wrapper_around_torch_muon_matches_its_reference():
    """ScheduleFreeWrapper(torch.optim.Muon) against the readable wrapper reference, same base optimizer."""
    shapes = [(9, 5), (5, 9)]
    start = fixed_grads(shapes, -1, F64)
    a = [nn.Parameter(t.clone()) for t in start]
    b = [nn.Parameter(t.clone()) for t in start]
    wrapped = sfoptim.ScheduleFreeWrapper(torch.optim.Muon(a, lr=0.02, weight_decay=0.1), momentum=0.9)
    ref = sfoptim.ScheduleFreeWrapperReference(torch.optim.Muon(b, lr=0.02, weight_decay=0.1), momentum=0.9)
    for step in range(15):
        for p, q, g in zip(a, b, fixed_grads(shapes, step, F64)):
            p.grad, q.grad = g.clone(), g.clone()
        wrapped.step()
        ref.step()
        assert max(rel(p, q) for p, q in zip(a, b)) < 1e-12, f"step {step + 1}"
    wrapped.eval()
    ref.eval()
    assert max(rel(p, q) for p, q in zip(a, b)) < 1e-12


def test_wrapper_around_torch_muon_trains():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 4)
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh(), nn.Linear(16, 4, bias=False))
    opt = sfoptim.ScheduleFreeWrapper(torch.optim.Muon(model.parameters(), lr=0.05, weight_decay=0.0), momentum=0.9)
    loss_fn = nn.functional.mse_loss
    start = loss_fn(model(x), y).item()
    for _ in range(100):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    opt.eval()
    assert loss_fn(model(x), y).item() < 0.15 * start


def test_docs_examples_run(tmp_path, monkeypatch):
    """The python blocks of docs/muon.md, in one namespace; the split they print is the documented one."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parent.parent / "docs" / "muon.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_muon"}
    exec(compile(blocks[0], str(page), "exec"), namespace)
    groups = namespace["opt"].param_groups
    assert groups[0]["param_names"] == ["mlp.0.weight", "mlp.2.weight"]
    assert groups[1]["param_names"] == ["embed.weight", "mlp.0.bias", "mlp.2.bias", "lm_head.weight", "lm_head.bias"]
    for block in blocks[1:]:
        exec(compile(block, str(page), "exec"), namespace)
    assert [g["lr"] for g in namespace["opt"].param_groups] == [0.02, 1e-3, 3e-3]
    assert not namespace["muon"].train_mode and not namespace["adamw"].train_mode


def test_auto_newton_schulz_dtype_follows_this_machines_hardware():
    """The default ("auto") steps exactly as the dtype this CPU multiplies natively: bfloat16 or float32."""
    from sfoptim.directions.muon import has_native_bf16

    native = torch.bfloat16 if has_native_bf16(torch.device("cpu")) else F32
    other = F32 if native is torch.bfloat16 else torch.bfloat16
    shapes = [(12, 7), (5,)]
    runs = {}
    for ns_dtype in ("auto", native, other):
        ps = [nn.Parameter(t) for t in fixed_grads(shapes, -1, F32)]
        opt = sfoptim.MuonScheduleFree(ps, lr=0.01, ns_dtype=ns_dtype)
        for step in range(3):
            for p, g in zip(ps, fixed_grads(shapes, step, F32)):
                p.grad = g
            opt.step()
        runs[ns_dtype] = [p.detach().clone() for p in ps]
    assert all(torch.equal(a, b) for a, b in zip(runs["auto"], runs[native]))
    assert not all(torch.equal(a, b) for a, b in zip(runs["auto"], runs[other]))
    with pytest.raises(ValueError, match="ns_dtype"):
        sfoptim.MuonScheduleFree([nn.Parameter(torch.zeros(3, 3))], ns_dtype="fast")


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({"avx2": True, "avx512_bf16": True, "amx_bf16": False}, torch.bfloat16),
        ({"avx512_bf16": False, "amx_bf16": True}, torch.bfloat16),
        ({"neon": True, "bf16": True}, torch.bfloat16),
        ({"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, F32),
        ({"neon": True}, F32),
        ({}, F32),
    ],
    ids=["avx512_bf16", "amx_bf16", "arm_bf16", "avx512_without_bf16", "arm_without_bf16", "nothing_reported"],
)
def test_auto_decides_from_the_cpus_capabilities(monkeypatch, capabilities, expected):
    from sfoptim.directions.muon import resolve_ns_dtype

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert resolve_ns_dtype("auto", torch.device("cpu")) is expected
    assert resolve_ns_dtype(torch.float16, torch.device("cpu")) is torch.float16
    assert resolve_ns_dtype(None, torch.device("cpu")) is None


def test_auto_on_other_devices(monkeypatch):
    from sfoptim.directions.muon import resolve_ns_dtype

    monkeypatch.delattr(torch.cpu, "get_capabilities")  # a torch that cannot tell
    assert resolve_ns_dtype("auto", torch.device("cpu")) is F32
    assert resolve_ns_dtype("auto", torch.device("meta")) is F32
    assert resolve_ns_dtype("auto", torch.device("mps")) is F32
    if not torch.cuda.is_available():
        assert resolve_ns_dtype("auto", torch.device("cuda")) is F32


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("normuon", [False, True], ids=["muon", "normuon"])
def test_a_matrix_without_elements_is_stepped(normuon):
    """nn.Linear(3, 0) (and a 0-column matrix) step as a no-op; the other parameters move as without them."""
    torch.manual_seed(0)
    full = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.empty(0, 3)),
            nn.Parameter(torch.empty(0)), nn.Parameter(torch.empty(3, 0))]  # fmt: skip
    alone = [nn.Parameter(p.detach().clone()) for p in full[:2]]
    kw = dict(lr=0.02, weight_decay=0.1, normuon=normuon)
    opt, ref = sfoptim.MuonScheduleFree(full, **kw), sfoptim.MuonScheduleFree(alone, **kw)
    for step in range(3):
        for p, g in zip(full, fixed_grads([tuple(p.shape) for p in full], step, F32)):
            p.grad = g
        for p, q in zip(alone, full):
            p.grad = q.grad.clone()
        opt.step()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(full, alone))
    assert opt.state[full[2]]["z"].shape == (0, 3)
    opt.eval()
    assert full[4].shape == (3, 0)
    reference = sfoptim.MuonScheduleFreeReference([nn.Parameter(p.detach().clone()) for p in full], **kw)
    for p in reference.param_groups[0]["params"] + reference.param_groups[1]["params"]:
        p.grad = torch.ones_like(p)
    reference.step()


def test_a_step_that_raises_leaves_every_buffer_as_it_was(monkeypatch):
    """A failure while orthogonalizing the second matrix: momentum, NorMuon's v, z and the parameters unchanged."""
    import sfoptim.directions.muon as muon_module

    shapes = [(6, 4), (4, 5)]
    ps = [nn.Parameter(t) for t in fixed_grads(shapes, -1, F32)]
    again = [nn.Parameter(t.detach().clone()) for t in ps]
    kw = dict(lr=0.02, normuon=True, weight_decay=0.1)
    opt, clean = sfoptim.MuonScheduleFree(ps, **kw), sfoptim.MuonScheduleFree(again, **kw)

    def feed(step):
        for p, q, g in zip(ps, again, fixed_grads(shapes, step, F32)):
            p.grad, q.grad = g.clone(), g.clone()

    feed(0)
    opt.step()
    clean.step()
    feed(1)
    before = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    params_before = [p.detach().clone() for p in ps]
    real = muon_module.newton_schulz
    calls = []

    def fails_on_the_second_matrix(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(muon_module, "newton_schulz", fails_on_the_second_matrix)
    for _ in range(2):  # a retry fails the same way and changes nothing either
        calls.clear()
        with pytest.raises(RuntimeError, match="injected"):
            opt.step()
        for p, state, p0 in zip(ps, before, params_before):
            assert torch.equal(p, p0)
            assert state.keys() == opt.state[p].keys()
            assert all(torch.equal(opt.state[p][k], v) for k, v in state.items()), "state changed by a failed step"
    monkeypatch.setattr(muon_module, "newton_schulz", real)
    opt.step()
    clean.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, again))


@pytest.mark.parametrize("scale", [1e5, 1e6, 1e-6], ids=["norm_over_65504", "entries_over_65504", "tiny"])
def test_float16_newton_schulz_normalizes_before_the_cast(scale):
    """The momentum is normalized in its own dtype first: huge or tiny gradients give float32's step, not 0 or NaN."""
    shapes = [(8, 6), (6, 8)]
    runs = {}
    for ns_dtype in (torch.float16, F32):
        ps = [nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = sfoptim.MuonScheduleFree(ps, lr=0.01, ns_dtype=ns_dtype)
        for step in range(2):
            for p, g in zip(ps, fixed_grads(shapes, step, F32)):
                p.grad = g * scale
            opt.step()
        runs[ns_dtype] = [opt.state[p]["z"] for p in ps]
    for half, single in zip(runs[torch.float16], runs[F32]):
        assert torch.isfinite(half).all() and single.norm() > 0
        assert rel(half, single) < 1e-2


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_adamw_groups_decaying_at_z_take_the_kernel_and_match_foreach(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype):
    """With the default decay at z, the AdamW groups (embedding, head, vectors) run on the fused CPU kernel."""
    from sfoptim.backends import cpu_kernel
    from sfoptim.backends.abi import KERNEL_SCALARS, Kind

    if not cpu_kernel.available():
        pytest.skip("no C compiler")
    wdz = KERNEL_SCALARS.index("wdz")
    taken: list[tuple[Kind, int, float]] = []
    original = cpu_kernel.step

    def spy(*args, **kwargs):
        ran = original(*args, **kwargs)
        if ran:
            taken.append((args[4], len(args[0]), args[5][wdz]))
        return ran

    monkeypatch.setattr(cpu_kernel, "step", spy)
    ends = []
    for fused in (None, False):
        torch.manual_seed(0)
        model = TinyLM().to(dtype)
        opt = sfoptim.MuonScheduleFree(model.named_parameters(), weight_decay=0.5, ns_dtype=None, fused=fused)
        assert opt.param_groups[1]["decay_at"] == "z" and not opt.param_groups[1]["use_muon"]
        shapes = [p.shape for p in model.parameters()]
        for step in range(4):
            for p, g in zip(model.parameters(), fixed_grads(shapes, step, dtype)):
                p.grad = g
            opt.step()
        ends.append([p.detach().clone() for p in model.parameters()])
        if fused is None:
            # One call per step for the AdamW group's 6 tensors, with the decay in the kernel's z slot, and
            # one for the Muon group's matrices (their orthogonalized update applied by the SGD family).
            assert sorted(t for t in taken if t[0] == Kind.ADAM) == [(Kind.ADAM, 6, 0.5)] * 4
            assert len([t for t in taken if t[0] == Kind.SGD and t[2] == 0.5]) == 4
    assert len(taken) == 8, "fused=False must not take the kernel"
    for a, b in zip(*ends):
        assert rel(a, b) <= (1e-12 if dtype == F64 else 1e-5)


def amuse_beta(beta: float, horizon: int, power: float, s: int) -> float:
    """AMUSE's interpolation weight of the gradient of step ``s`` (Kim et al., 2026), written out independently."""
    return beta if s <= horizon else 1 - ((horizon - 1) / (s - 1)) ** power * (1 - beta)


WARMUP_RISE_KW = dict(lr=0.02, beta=0.7, beta_horizon="warmup", beta_power=0.3, warmup_steps=3, weight_decay=0.05,
                      ns_dtype=None)  # fmt: skip


def test_beta_rising_after_warmup_follows_amuse():
    """``beta_horizon="warmup"``: y = (1-b) z + b x with AMUSE's b, T0 = warmup_steps, in the reference and the engine."""
    shapes = [(5, 4), (4,)]
    a = [nn.Parameter(t) for t in fixed_grads(shapes, -1, F64)]
    b = [nn.Parameter(t.clone()) for t in a]
    opt = sfoptim.MuonScheduleFree(list(zip("wb", a)), **WARMUP_RISE_KW)
    ref = sfoptim.MuonScheduleFreeReference(list(zip("wb", b)), **WARMUP_RISE_KW)
    for t in range(1, 9):
        for p, q, g in zip(a, b, fixed_grads(shapes, t, F64)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        want = amuse_beta(0.7, 3, 0.3, t + 1)  # the y built by step t is where the gradient of step t + 1 is taken
        if t + 1 > 3:
            assert want > 0.7
        for q in b if t > 1 else ():  # after the first step x = z
            s = ref.state[q]
            toward_x = s["x"] - s["z"]
            got = float(((s["y"] - s["z"]) * toward_x).sum() / toward_x.square().sum())
            assert got == pytest.approx(want, abs=1e-9), f"step {t}"
        assert max(rel(p, q) for p, q in zip(a, b)) < 1e-10, f"step {t}"


def test_beta_rising_after_warmup_is_the_warmup_length_as_horizon():
    shapes = [(6, 3), (3,)]
    runs = []
    for horizon in ("warmup", 3):
        ps = [nn.Parameter(t) for t in fixed_grads(shapes, -1, F32)]
        opt = sfoptim.MuonScheduleFree(list(zip("wb", ps)), **dict(WARMUP_RISE_KW, beta_horizon=horizon))
        for t in range(6):
            for p, g in zip(ps, fixed_grads(shapes, t, F32)):
                p.grad = g
            opt.step()
        runs.append(ps)
    assert all(torch.equal(p, q) for p, q in zip(*runs))


def test_beta_rising_after_warmup_round_trips_and_is_validated():
    shapes = [(6, 3), (3,)]
    ps = [nn.Parameter(t) for t in fixed_grads(shapes, -1, F32)]
    qs = [nn.Parameter(t.clone()) for t in ps]
    opt = sfoptim.MuonScheduleFree(list(zip("wb", ps)), **WARMUP_RISE_KW)
    for t in range(5):
        for p, g in zip(ps, fixed_grads(shapes, t, F32)):
            p.grad = g
        opt.step()
    with torch.no_grad():
        for p, q in zip(ps, qs):
            q.copy_(p)
    again = sfoptim.MuonScheduleFree(list(zip("wb", qs)), **dict(WARMUP_RISE_KW, beta_horizon=None, warmup_steps=7))
    again.load_state_dict(copy.deepcopy(opt.state_dict()))  # a load keeps the very tensors it is given
    assert all(g["beta_horizon"] == "warmup" and g["warmup_steps"] == 3 for g in again.param_groups)
    for t in range(5, 9):
        for o, params in ((opt, ps), (again, qs)):
            for p, g in zip(params, fixed_grads(shapes, t, F32)):
                p.grad = g
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    for cls in (sfoptim.MuonScheduleFree, sfoptim.MuonScheduleFreeReference):
        with pytest.raises(ValueError, match="beta_horizon"):
            cls([("w", nn.Parameter(torch.ones(3, 3)))], beta_horizon="warmup", warmup_steps=0)
        with pytest.raises(ValueError, match="beta_horizon"):
            cls([("w", nn.Parameter(torch.ones(3, 3)))], beta_horizon="later")
