"""The cache plugin on an Open-Sora 1.3 STDiT3 (window attention, 3-D rope, i2v conditioning),
through the public API: ``none`` bitwise, plans followed, exact reuse, token scores of window
attention, every registered policy."""
from __future__ import annotations

import pytest
import torch
from cache_utils import Scripted, inputs, plan_of, small_model, trajectory

from opensora_duca.cache import Action, Kind, apply_cache, build_policy, remove_cache
from opensora_duca.cache.plan import KINDS
from opensora_duca.cache.policies import AdaptivePolicy
from opensora_duca.registry import CACHES, registered

V13 = dict(hidden=48, heads=4, kernel_size=(2, 4, -1), use_spatial_rope=True,
           cond_embedders=True)
H, W = 6, 10  # latent 3 x 5 after the patch: windows of 2 x 4 are padded
STEPS = 10


def model13(**kw):
    return small_model(**dict(V13, **kw))


def i2v_args(x, y, frames=(0,)):
    cond_mask = torch.zeros_like(x)
    cond_mask[:, :, list(frames)] = 1.0
    g = torch.Generator().manual_seed(9)
    return dict(cond=x * cond_mask, cond_mask=cond_mask, mask_index=list(frames),
                y_null=torch.randn(y.shape, generator=g))


@pytest.mark.parametrize("i2v", [False, True])
def test_none_is_bitwise_identical(i2v):
    m = model13()
    x, y, mask = inputs(h=H, w=W)
    kw = i2v_args(x, y) if i2v else {}
    ref = trajectory(m, x, y, mask, steps=4, **kw)
    mgr = apply_cache(m, dict(type="none"))
    with mgr.session(num_steps=4):
        out = trajectory(m, x, y, mask, steps=4, **kw)
    remove_cache(m)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert all(torch.equal(a, b) for a, b in zip(trajectory(m, x, y, mask, steps=4, **kw), ref))


@pytest.mark.parametrize("name", sorted(registered(CACHES)))
def test_every_policy_follows_its_plan_on_a_13_model(name):
    m = model13()
    x, y, mask = inputs(h=H, w=W)
    ref = trajectory(m, x, y, mask, steps=STEPS)
    pol = build_policy(dict(type=name))
    mgr = apply_cache(m, pol)
    with mgr.session(num_steps=STEPS):
        out = trajectory(m, x, y, mask, steps=STEPS)
        stats = mgr.stats()
    remove_cache(m)
    if not isinstance(pol, AdaptivePolicy):
        ts = [1000.0 * (1 - i / STEPS) for i in range(STEPS)]
        want = [str(pol.plan(s, STEPS, ts[:s + 1]).label) for s in range(STEPS)]
        assert [str(lab) for lab in stats["step_labels"]] == want
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(out, ref))
    assert err < 0.5, err  # cached, not broken (exactness is checked below)
    full = [s for s, lab in enumerate(stats["step_labels"]) if lab == "full"]
    assert all(torch.equal(out[s], ref[s]) for s in full[:1])


def test_ratio_one_partial_equals_full():
    m = model13()
    x, y, mask = inputs(h=H, w=W)
    ref = trajectory(m, x, y, mask, steps=3)
    pol = Scripted({1: plan_of(mlp=(Action.PARTIAL, 1.0)),
                    2: plan_of(cross_attn=(Action.PARTIAL, 1.0), mlp=(Action.PARTIAL, 1.0))})
    mgr = apply_cache(m, pol)
    with mgr.session(num_steps=3):
        out = trajectory(m, x, y, mask, steps=3)
    assert mgr.stats()["modules"][Kind.MLP][Action.PARTIAL] == 2 * 2 * 2
    remove_cache(m)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _reuse_right_after_full(m, x, y, mask, **kw):
    """Reuse every module (and the conservative path with ratio 1) right after a full step
    with the same inputs; the timestep embedding is made constant so both calls match."""
    with torch.no_grad():
        m.t_embedder.mlp[2].weight.zero_()
    t, t_next = torch.full((2,), 700.0), torch.full((2,), 600.0)
    with torch.no_grad():
        ref = m(x, t, y, mask=mask, **kw)
    for plan in (plan_of(**{k: Action.REUSE for k in KINDS}),
                 plan_of(spatial_attn=Action.REUSE, temporal_attn=Action.REUSE,
                       cross_attn=Action.REUSE, mlp=(Action.PARTIAL, 1.0))):
        mgr = apply_cache(m, Scripted({1: plan}))
        with mgr.session(num_steps=2), torch.no_grad():
            out0 = m(x, t, y, mask=mask, **kw)
            out1 = m(x, t_next, y, mask=mask, **kw)
        remove_cache(m)
        assert torch.equal(out0, ref)
        torch.testing.assert_close(out1, ref, rtol=1e-5, atol=1e-5)


def test_reuse_after_full_equals_stored_value():
    m = model13()
    x, y, mask = inputs(h=H, w=W)
    _reuse_right_after_full(m, x, y, mask)


@pytest.mark.parametrize("frames", [(0,), (0, 2)])
def test_i2v_reuse_after_full_equals_stored_value(frames):
    """i2v / v2v blocks call cross_attn twice (the given frames with y_null, the rest with y):
    the runner stores one output per call and reuses each for its own call."""
    m = model13()
    x, y, mask = inputs(h=H, w=W, frames=4 if len(frames) == 2 else 3)
    _reuse_right_after_full(m, x, y, mask, **i2v_args(x, y, frames))


def test_vnorm_scores_of_window_attention_are_in_token_order():
    """The value-vector norms the plugin captures from ``attn.qkv`` of a window-attention
    block equal r_i = sum_h (1 - ||v_i^h||) computed here, token i = t * S + s."""
    m = model13()
    x, y, mask = inputs(h=H, w=W)
    blk = m.temporal_blocks[1]
    seen = {}
    pre = blk.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    mgr = apply_cache(m, dict(type="DuCa"))
    with mgr.session(num_steps=STEPS):
        trajectory(m, x, y, mask, steps=1)
        score = mgr.slots[3].state.score.clone()  # temporal block 1
    remove_cache(m)
    pre.remove()
    B, T, S, C = 2, 3, 15, 48
    with torch.no_grad():
        t = torch.full((B,), 1000.0)
        t_emb = m.t_embedder(t) + m.fps_embedder(torch.tensor([24.0]), B)
        mods = (blk.scale_shift_table[None] + m.t_block(t_emb).view(B, 6, C))
        h = blk.norm1(seen["x"]) * (1 + mods[:, 1:2]) + mods[:, 0:1]  # [B, T*S, C]
        v = blk.attn.qkv(h)[..., 2 * C:].view(B, T * S, 4, C // 4)
    want = (1 - v.norm(dim=-1)).sum(-1)
    torch.testing.assert_close(score, want, rtol=1e-5, atol=1e-5)


def test_attention_scores_of_window_attention():
    """ToCa's attention scorer on window attention (math backend): what each token receives,
    in token order; every real query hands out 1 per head, padded ones nothing."""
    m = model13(attn_backend="math")
    x, y, mask = inputs(h=H, w=W)
    mgr = apply_cache(m, dict(type="ToCa", scorer="attention"))
    with mgr.session(num_steps=STEPS):
        out = trajectory(m, x, y, mask, steps=5)
        score = mgr.slots[3].state.score.clone()
        labels = mgr.stats()["step_labels"]
    remove_cache(m)
    assert "conservative" in labels and all(torch.isfinite(o).all() for o in out)
    assert score.shape == (2, 3 * 15)
    torch.testing.assert_close(score.sum(-1), torch.full((2,), 4.0 * 3 * 15))
    # window of 2 x 4 over a 3 x 5 grid: tokens in row 2 / column 4 share windows with fewer
    # queries, so scores are not all equal
    assert score.std() > 1e-3


@pytest.mark.parametrize("skip_temporal", [False, True])
def test_runtime_flops_know_window_attention_and_skip_temporal(skip_temporal):
    """The manager's FLOPs count equals the analytic count of the same plan on the same trunk
    (window-attention temporal blocks, or none with skip_temporal), and every policy runs."""
    from opensora_duca.cache.flops import TrunkShape, run_flops_ratio

    m = model13(skip_temporal=skip_temporal)
    x, y, mask = inputs(h=H, w=W)
    for cfg in (dict(type="DuCa", scorer="random"), dict(type="FirstBlockCache", threshold=0.0)):
        mgr = apply_cache(m, cfg)
        with mgr.session(num_steps=STEPS):
            trajectory(m, x, y, mask, steps=STEPS)
            s = mgr.stats()
        assert len(mgr.slots) == (2 if skip_temporal else 4)
        remove_cache(m)
        kernel = None if skip_temporal else tuple(V13["kernel_size"])
        shape = TrunkShape(batch=2, frames=3, spatial=15, hidden=V13["hidden"], depth=2,
                           caption_len=8, mlp_hidden=4 * V13["hidden"],
                           temporal=not skip_temporal, temporal_kernel=kernel, rows=3, width=5)
        if cfg["type"] == "DuCa":
            ref = run_flops_ratio(build_policy(cfg), STEPS, shape, 3, 5)
            assert abs(s["flops_ratio"] - ref["flops_ratio"]) < 1e-9
        else:  # threshold 0: every step computes the whole trunk
            assert s["flops_ratio"] == pytest.approx(1.0)
