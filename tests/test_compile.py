"""The ``compile`` option: compiled regions (inductor on the CPU, fullgraph=True, so a graph
break inside a block fails) give the eager results within fp32 tolerance, the same step plan and
the same selected tokens; the number of compiled graphs is bounded by the step kinds and block
types and a second run compiles nothing; a missing C++ compiler or a bad option is a clear
error. Inductor compiles slowly on a CPU, so the model is tiny (hidden 32, depth 2, 6 steps)."""
from __future__ import annotations

import pytest
import torch
from cache_utils import inputs, small_model

from opensora_duca.cache import apply_cache, remove_cache
from opensora_duca.cache import selection as sel
from opensora_duca.utils import compile as cmp

TIMESTEPS = [1000.0 - 150.0 * i for i in range(6)]
# DuCa with one warm-up step: full, conservative, aggressive, cross-reused, conservative, aggr.
DUCA = dict(type="DuCa", warmup_steps=1)
# graphs per block type (spatial, temporal): none: the block forward; DuCa: the block forward
# of full and cross-reused steps, and the three conservative functions
BOUND = {"none": 2 * 1, "DuCa": 2 * 5}


def _run(model, policy, compile_cfg, monkeypatch):
    """Outputs of every step, the manager's stats and the selected token indices."""
    picked = []
    select = sel.select_tokens

    def recording(*args, **kwargs):
        idx = select(*args, **kwargs)
        picked.append(idx.clone())
        return idx
    monkeypatch.setattr(sel, "select_tokens", recording)
    x, y, mask = inputs()
    mgr = apply_cache(model, policy, compile=compile_cfg)
    outs = []
    try:
        with mgr.session(len(TIMESTEPS), timesteps=TIMESTEPS), torch.no_grad():
            for t in TIMESTEPS:
                outs.append(model(x, torch.full((2,), t), y, mask=mask))
        stats = mgr.stats()
    finally:
        remove_cache(model)
        monkeypatch.setattr(sel, "select_tokens", select)
    return outs, stats, picked


@pytest.fixture(scope="module")
def runs():
    torch._dynamo.reset()
    torch.set_num_threads(1)
    model = small_model(depth=2, hidden=32)
    mp = pytest.MonkeyPatch()
    out, comp = {}, dict(fullgraph=True)
    try:
        for name, policy in (("none", dict(type="none")), ("DuCa", DUCA)):
            eager = _run(model, policy, None, mp)
            g0 = cmp.compiled_graphs()
            first = _run(model, policy, comp, mp)
            g1 = cmp.compiled_graphs()
            second = _run(model, policy, comp, mp)
            out[name] = dict(eager=eager, first=first, second=second, graphs=g1 - g0,
                             graphs_second=cmp.compiled_graphs() - g1)
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("policy", ["none", "DuCa"])
def test_compiled_equals_eager(runs, policy):
    r = runs[policy]
    eager_outs, eager_stats, eager_idx = r["eager"]
    for outs, stats, idx in (r["first"], r["second"]):
        for a, b in zip(outs, eager_outs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert stats["step_labels"] == eager_stats["step_labels"]
        assert stats["modules"] == eager_stats["modules"]
        assert stats["partial_tokens"] == eager_stats["partial_tokens"]
        assert len(idx) == len(eager_idx)
        assert all(torch.equal(a, b) for a, b in zip(idx, eager_idx))


def test_the_plan_uses_every_region(runs):
    labels = runs["DuCa"]["eager"][1]["step_labels"]
    assert labels == ["full", "conservative", "aggressive", "full (cross-attn reused)",
                      "conservative", "aggressive"]
    assert runs["DuCa"]["eager"][1]["partial_tokens"] > 0


@pytest.mark.parametrize("policy", ["none", "DuCa"])
def test_graphs_are_bounded_and_not_recompiled(runs, policy):
    r = runs[policy]
    assert 1 <= r["graphs"] <= BOUND[policy]
    assert r["graphs_second"] == 0  # the same step kinds: no new graph, no recompilation


def test_missing_cxx_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(cmp.shutil, "which", lambda name: None)
    model = small_model(depth=1, hidden=32)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler.*aot_eager"):
        apply_cache(model, DUCA, compile=True)
    assert getattr(model, "_duca_cache_manager", None) is None
    apply_cache(model, DUCA, compile=dict(backend="aot_eager"))  # needs no C++ compiler
    remove_cache(model)


@pytest.mark.parametrize("cfg, match", [
    (dict(mode="fastest"), "compile mode='fastest'.*accepted"),
    (dict(fullgraph="yes"), "compile fullgraph='yes'.*True or False"),
    (dict(speed=1), "compile.speed.*accepted keys"),
    ("inductor", "config key 'compile'='inductor'.*accepted"),
])
def test_bad_compile_options(cfg, match):
    with pytest.raises(ValueError, match=match):
        cmp.compile_options(cfg)


def test_config_key_compiles_the_uncached_pipeline():
    from test_pipeline import PROMPTS, tiny_cfg

    from opensora_duca.pipeline import build_from_config

    base = build_from_config(tiny_cfg(), device="cpu")
    assert base.cache_manager is None
    comp = build_from_config(tiny_cfg(compile=dict(backend="aot_eager", fullgraph=True)),
                             device="cpu")
    mgr = comp.cache_manager
    assert mgr.policy.name == "none" and mgr.regions.compiled
    a = base.generate(PROMPTS[:1])["latents"]
    b = comp.generate(PROMPTS[:1])["latents"]
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="compile mode='fast'"):
        build_from_config(tiny_cfg(compile=dict(mode="fast")), device="cpu")
