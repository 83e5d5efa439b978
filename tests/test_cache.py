"""The cache plugin on one process: exactness where it must be exact, plans, FLOPs, state."""
from __future__ import annotations

import pytest
import torch
from cache_utils import Scripted, inputs, plan_of, small_model, trajectory

from opensora_duca.cache import apply_cache, build_policy, get_cache_manager, remove_cache
from opensora_duca.cache.flops import TrunkShape, run_flops_ratio
from opensora_duca.cache.plan import FULL_STEP, KINDS, Action, Kind

SPATIAL_ATTN, TEMPORAL_ATTN, CROSS_ATTN, MLP = Kind
FULL, REUSE, PARTIAL = Action


def test_none_is_bitwise_identical_and_remove_restores():
    m = small_model()
    x, y, mask = inputs()
    ref = trajectory(m, x, y, mask, steps=4)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    mgr = apply_cache(m, dict(type="none"))
    with mgr.session(num_steps=4):
        out = trajectory(m, x, y, mask, steps=4)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    remove_cache(m)
    assert get_cache_manager(m) is None
    assert all("forward" not in mod.__dict__ for b in [*m.spatial_blocks, *m.temporal_blocks]
               for mod in (b, b.attn, b.cross_attn, b.mlp))
    assert not m._forward_pre_hooks and not m._forward_hooks
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    # a DuCa run in between leaves nothing behind either
    mgr = apply_cache(m, dict(type="DuCa"))
    with mgr.session(num_steps=10):
        trajectory(m, x, y, mask, steps=10)
    assert all("forward" in b.mlp.__dict__ for b in m.spatial_blocks)  # taps while attached
    remove_cache(m)
    assert all("forward" not in mod.__dict__ for b in [*m.spatial_blocks, *m.temporal_blocks]
               for mod in (b, b.attn, b.cross_attn, b.mlp))
    assert all(torch.equal(a, b) for a, b in zip(trajectory(m, x, y, mask, steps=4), ref))


def test_full_steps_through_the_runner_are_bitwise_identical():
    """A policy that stores everything but always computes runs the runner's general path."""
    m = small_model()
    x, y, mask = inputs()
    ref = trajectory(m, x, y, mask, steps=3)
    mgr = apply_cache(m, Scripted({}))
    with mgr.session(num_steps=3):
        out = trajectory(m, x, y, mask, steps=3)
    assert mgr.stats()["modules"][MLP][FULL] == 3 * 2 * 2
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


@pytest.mark.parametrize("demo_options", [False, True])
@pytest.mark.parametrize("use_x_mask", [False, True])
def test_ratio_one_partial_equals_full(use_x_mask, demo_options):
    # demo_options: the demo preset's frame-index embedding
    m = small_model(**(dict(temporal_pos_embed=True) if demo_options else {}))
    x, y, mask = inputs()
    x_mask = torch.tensor([[True, False, True], [False, True, True]]) if use_x_mask else None
    ref = trajectory(m, x, y, mask, steps=3, x_mask=x_mask)
    pol = Scripted({1: plan_of(mlp=(PARTIAL, 1.0)), 2: plan_of(cross_attn=(PARTIAL, 1.0),
                                                             mlp=(PARTIAL, 1.0))})
    mgr = apply_cache(m, pol)
    with mgr.session(num_steps=3):
        out = trajectory(m, x, y, mask, steps=3, x_mask=x_mask)
    assert mgr.stats()["modules"][MLP][PARTIAL] == 2 * 2 * 2
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_reuse_after_full_equals_stored_value():
    """Same inputs twice: reusing every module (and the token-sparse conservative path with
    ratio 1) right after the full step gives the full step's output. A session's steps need
    decreasing timesteps, so the timestep embedding is made constant (its last layer zeroed):
    the two calls then see the same conditioning."""
    m = small_model()
    with torch.no_grad():
        m.t_embedder.mlp[2].weight.zero_()
    x, y, mask = inputs()
    t, t_next = torch.full((2,), 700.0), torch.full((2,), 600.0)
    with torch.no_grad():
        ref = m(x, t, y, mask=mask)
        assert torch.equal(m(x, t_next, y, mask=mask), ref)
    captured = {}

    def grab(mod, args, out):
        captured.setdefault("mlp", out.clone())  # returns None: the output is not replaced

    h = m.spatial_blocks[1].mlp.register_forward_hook(grab)
    for plan in (plan_of(**{k: REUSE for k in KINDS}),
                 plan_of(spatial_attn=REUSE, temporal_attn=REUSE, cross_attn=REUSE,
                       mlp=(PARTIAL, 1.0))):
        captured.clear()
        mgr = apply_cache(m, Scripted({1: plan}))
        with mgr.session(num_steps=2), torch.no_grad():
            out0 = m(x, t, y, mask=mask)
            stored = mgr.slots[2].state.mlp.terms[0].data.clone()  # spatial block 1
            out1 = m(x, t_next, y, mask=mask)
        remove_cache(m)
        assert torch.equal(out0, ref)
        torch.testing.assert_close(stored.view_as(captured["mlp"]), captured["mlp"], rtol=0, atol=0)
        torch.testing.assert_close(out1, ref, rtol=1e-5, atol=1e-5)
    h.remove()


def test_token_sparse_conservative_step_runs_mlp_on_selected_tokens_only():
    m = small_model()
    x, y, mask = inputs()  # latent 3 x 8 x 10 -> T=3, H=4, W=5, N=60 tokens
    rows = []
    hook = m.spatial_blocks[0].mlp.fc1.register_forward_hook(
        lambda mod, a, o: rows.append(a[0].shape))
    mgr = apply_cache(m, dict(type="DuCa", warmup_steps=1, fresh_ratio=0.2,
                              ratio_factors=dict(mlp=1.0)))
    with mgr.session(num_steps=3):
        trajectory(m, x, y, mask, steps=3)  # steps: full, conservative, aggressive
    hook.remove()
    # full step: all 60 tokens of each sample; conservative: round(0.2*20)=4 per frame -> 12
    assert tuple(rows[0]) == (2, 3, 20, 64)  # full step: [B, T, S, C]
    assert tuple(rows[1]) == (2, 12, 64)     # conservative: [B, k, C] gathered tokens
    assert len(rows) == 2  # the aggressive step ran no block at all
    s = mgr.stats()
    assert s["steps_by_kind"] == {"full": 1, "conservative": 1, "aggressive": 1}
    assert s["modules"]["trunk"][REUSE] == 4


def test_duca_default_plan_over_30_steps():
    pol = build_policy(dict(type="DuCa"))
    labels = [pol.plan(s, 30, [1000 * (1 - i / 30) for i in range(s + 1)]).label
              for s in range(30)]

    def idx(lab):
        return [i for i, got in enumerate(labels) if got == lab]

    assert idx("full") == [0, 1, 2, 6, 12, 18, 24]
    assert idx("full (cross-attn reused)") == [3, 9, 15, 21, 27]
    assert idx("conservative") == list(range(4, 30, 3))
    assert idx("aggressive") == list(range(5, 30, 3))
    p = pol.plan(4, 30, [0] * 5)
    assert p.actions == {SPATIAL_ATTN: REUSE, TEMPORAL_ATTN: REUSE, CROSS_ATTN: REUSE, MLP: PARTIAL}
    assert abs(p.ratios[MLP] - 0.1495) < 1e-12
    assert pol.plan(5, 30, [0] * 6).skip_trunk
    assert pol.scorer == "vnorm" and pol.staleness_bonus == 0.25


def test_toca_and_final_step_options():
    toca = build_policy(dict(type="ToCa"))
    labels = [toca.plan(s, 30, [0] * (s + 1)).label for s in range(30)]
    assert labels.count("conservative") == 18 and "aggressive" not in labels
    duca = build_policy(dict(type="DuCa", final_step="full"))
    assert duca.plan(29, 30, [0] * 30).is_full() and not duca.plan(28, 30, [0] * 29).is_full()


XL_480P = TrunkShape(batch=2, frames=15, spatial=30 * 53, hidden=1152, depth=28, caption_len=300,
                     mlp_hidden=4608)


def test_analytic_flops_ratio_matches_the_papers():
    """Counting convention in opensora_duca/cache/flops.py (trunk matmuls, 2 FLOPs per MAC)."""
    duca = run_flops_ratio(build_policy(dict(type="DuCa")), 30, XL_480P, 30, 53)
    toca = run_flops_ratio(build_policy(dict(type="ToCa")), 30, XL_480P, 30, 53)
    assert abs(duca["flops_ratio"] - 2.50) <= 0.05, duca["flops_ratio"]
    assert abs(toca["flops_ratio"] - 2.36) <= 0.05, toca["flops_ratio"]
    # the share of each module kind is as the reference states (~35% / 14% / 52%)
    from opensora_duca.cache.flops import full_step_flops, module_flops
    full = full_step_flops(XL_480P) / XL_480P.depth
    attn = (module_flops(XL_480P, SPATIAL_ATTN) + module_flops(XL_480P, TEMPORAL_ATTN)) / full
    assert 0.30 < attn < 0.38


def test_runtime_flops_count_equals_analytic():
    m = small_model()
    x, y, mask = inputs()
    mgr = apply_cache(m, dict(type="DuCa", scorer="random"))
    with mgr.session(num_steps=12):
        trajectory(m, x, y, mask, steps=12)
        s = mgr.stats()
    shape = TrunkShape(batch=2, frames=3, spatial=20, hidden=64, depth=2, caption_len=8,
                       mlp_hidden=256)
    ref = run_flops_ratio(build_policy(dict(type="DuCa")), 12, shape, 4, 5)
    assert abs(s["flops_ratio"] - ref["flops_ratio"]) < 1e-9
    assert s["step_labels"] == ref["labels"]


def test_back_to_back_runs_leak_no_state():
    m = small_model()
    xa, ya, ma = inputs(seed=1)
    xb, yb, mb = inputs(seed=2)
    mgr = apply_cache(m, dict(type="DuCa"))
    with mgr.session(num_steps=10):
        trajectory(m, xa, ya, ma, steps=10)
    assert mgr.stats()["stored_bytes"] == 0 and mgr.stats()["peak_stored_bytes"] > 0
    with mgr.session(num_steps=10):
        b_after_a = trajectory(m, xb, yb, mb, steps=10)
    remove_cache(m)
    fresh = small_model()
    mgr2 = apply_cache(fresh, dict(type="DuCa"))
    with mgr2.session(num_steps=10):
        b_fresh = trajectory(fresh, xb, yb, mb, steps=10)
    assert all(torch.equal(a, b) for a, b in zip(b_after_a, b_fresh))
    # without sessions: a timestep that does not decrease starts a new run
    remove_cache(fresh)
    mgr3 = apply_cache(fresh, dict(type="DuCa"))
    trajectory(fresh, xa, ya, ma, steps=10)
    b_auto = trajectory(fresh, xb, yb, mb, steps=10)
    assert mgr3.runs == 2
    assert all(torch.equal(a, b) for a, b in zip(b_auto, b_fresh))


def test_shape_change_mid_run_resets_instead_of_crashing():
    """A new input shape starts a new run: its first step is a full step, equal to the
    unpatched model's output at the same inputs."""
    m = small_model()
    x, y, mask = inputs()
    x4, y4, m4 = inputs(batch=4, seed=3)
    x2, y2, m2 = inputs(h=6, w=6, seed=4)
    with torch.no_grad():
        fresh4 = m(x4, torch.full((4,), 800.0), y4, mask=m4)
        fresh2 = m(x2, torch.full((2,), 700.0), y2, mask=m2)
    mgr = apply_cache(m, dict(type="DuCa", warmup_steps=1))
    with mgr.session(num_steps=6), torch.no_grad():
        for i in range(3):
            m(x, torch.full((2,), 900.0 - i), y, mask=mask)
        out = m(x4, torch.full((4,), 800.0), y4, mask=m4)  # batch size changed
    assert mgr.stats()["step_labels"][-1] == "full"  # the new run starts at step 0
    assert torch.equal(out, fresh4)
    with torch.no_grad():  # resolution changed, no session
        m(x, torch.full((2,), 900.0), y, mask=mask)
        m(x, torch.full((2,), 800.0), y, mask=mask)
        out2 = m(x2, torch.full((2,), 700.0), y2, mask=m2)
    assert torch.equal(out2, fresh2)


def test_stored_dtype_and_memory_accounting():
    m = small_model()
    x, y, mask = inputs()
    sizes = {}
    for dt in (None, "bf16"):
        mgr = apply_cache(m, dict(type="DuCa", stored_dtype=dt))
        with mgr.session(num_steps=10):
            trajectory(m, x, y, mask, steps=10)
            sizes[dt] = mgr.stats()["peak_stored_bytes"]
        remove_cache(m)
    # fp32 model: three [B, N, C] features per block plus scores, then trunk output
    assert sizes[None] > 0 and sizes["bf16"] < sizes[None] * 0.6


@pytest.mark.parametrize("cfg, match", [
    (dict(type="Nope"), "registered policies"),
    (dict(type="DuCa", scorer="magic"), "scorer"),
    (dict(type="DuCa", fresh_ratio=1.5), r"fresh_ratio=1.5.*\[0, 1\]"),
    (dict(type="DuCa", fresh_ratio=-0.1), "fresh_ratio"),
    (dict(type="DuCa", cycles=dict(mlp=0)), r"cycles.mlp=0"),
    (dict(type="DuCa", cycles=dict(nope=2)), "cycles.nope"),
    (dict(type="DuCa", tables=dict(mlp=["full", "bogus", "full"])), "tables.mlp"),
    (dict(type="DuCa", bogus_key=1), "unknown key 'bogus_key'"),
    (dict(type="DuCa", stored_dtype="fp64"), "stored_dtype"),
    (dict(type="FORA", interval=0), "interval"),
    (dict(type="PAB", timestep_window=(900, 100)), "timestep_window"),
    ("DuCa", "must be a dict"),
])
def test_bad_config_errors(cfg, match):
    m = small_model(depth=1)
    with pytest.raises((ValueError, KeyError), match=match):
        apply_cache(m, cfg)
    assert get_cache_manager(m) is None


def test_unknown_policy_lists_registered():
    with pytest.raises(KeyError) as e:
        build_policy(dict(type="Nope"))
    for name in ("none", "DuCa", "ToCa", "FORA", "PAB", "TrunkReuse"):
        assert name in str(e.value)


def test_warmup_longer_than_run():
    m = small_model(depth=1)
    mgr = apply_cache(m, dict(type="DuCa", warmup_steps=12))
    with pytest.raises(ValueError, match="num_steps=10"):
        with mgr.session(num_steps=10):
            pass


def test_attention_scorer_needs_math_backend():
    m = small_model(depth=1)
    with pytest.raises(ValueError, match="'math'"):
        apply_cache(m, dict(type="DuCa", scorer="attention"))
    mm = small_model(depth=1, attn_backend="math")
    x, y, mask = inputs()
    mgr = apply_cache(mm, dict(type="DuCa", scorer="attention"))
    with mgr.session(num_steps=8):
        out = trajectory(mm, x, y, mask, steps=8)
    assert all(torch.isfinite(o).all() for o in out)
    assert mgr.stats()["modules"][MLP][PARTIAL] > 0


@pytest.mark.parametrize("scorer", ["vnorm", "random", "similarity", "norm"])
def test_every_scorer_runs_and_stays_close(scorer):
    """Against the uncached outputs: every scorer stays within 5% relative error at every
    step, and recomputing 30% of the tokens is closer than recomputing none (pure reuse at the
    same plan), so the recomputed tokens land where they belong."""
    m = small_model()
    x, y, mask = inputs()
    ref = trajectory(m, x, y, mask, steps=8)
    err = {}
    for ratio in (0.0, 0.3):
        mgr = apply_cache(m, dict(type="ToCa", scorer=scorer, cfg_shared_selection=True,
                                  fresh_ratio=ratio, ratio_factors=dict(mlp=1.0)))
        with mgr.session(num_steps=8):
            out = trajectory(m, x, y, mask, steps=8)
            stats = mgr.stats()
        remove_cache(m)
        assert (stats["partial_tokens"] > 0) == (ratio > 0)
        err[ratio] = max(float((a - b).norm() / b.norm()) for a, b in zip(out, ref))
    assert err[0.3] < 0.05, err
    assert err[0.3] < err[0.0], err


def test_patched_blocks_survive_wrappers_calling_block():
    """A gradient-checkpoint style wrapper that calls ``block(...)`` still goes through the
    cache (reuse counted), and the same output comes out as without the wrapper."""
    from torch.utils.checkpoint import checkpoint

    m = small_model()
    x, y, mask = inputs()
    mgr = apply_cache(m, dict(type="FORA", interval=2))
    with mgr.session(num_steps=4):
        plain = trajectory(m, x, y, mask, steps=4)
    blocks = list(m.spatial_blocks)

    class Wrapped(torch.nn.Module):
        def __init__(self, blk):
            super().__init__()
            self.blk = blk

        def forward(self, *a):
            return checkpoint(self.blk, *a, use_reentrant=False)

    # call through the wrapper by routing the ModuleList entries
    m.spatial_blocks = torch.nn.ModuleList([Wrapped(b) for b in blocks])
    try:
        # the manager patched the block instances, which the wrappers call
        with mgr.session(num_steps=4):
            wrapped = trajectory(m, x, y, mask, steps=4)
    finally:
        m.spatial_blocks = torch.nn.ModuleList(blocks)
    assert mgr.stats()["modules"][MLP][REUSE] > 0
    assert all(torch.equal(a, b) for a, b in zip(plain, wrapped))


def test_partial_updates_persist_in_lower_precision_storage():
    """With stored_dtype bf16 (fp32 model), a token-subset recompute must update the stored
    feature itself, not a converted copy: after a ratio-1 partial step the stored cross-attention
    equals the one a full step stores at the same inputs."""
    m = small_model()
    x, y, mask = inputs()

    class Low(Scripted):
        stored_dtype = "bf16"

    stored = {}
    for name, plan in (("partial", plan_of(cross_attn=(PARTIAL, 1.0))), ("full", FULL_STEP)):
        mgr = apply_cache(m, Low({1: plan}))
        assert mgr.codec.cast == torch.bfloat16
        with mgr.session(num_steps=3), torch.no_grad():
            for i in range(2):
                m(x * (1 - i / 4), torch.full((2,), 900.0 - 300 * i), y, mask=mask)
                stored[(name, i)] = mgr.slots[1].state.cross.terms[0].data.clone()
        remove_cache(m)
    assert stored[("partial", 1)].dtype == torch.bfloat16
    assert not torch.equal(stored[("partial", 1)], stored[("partial", 0)])
    torch.testing.assert_close(stored[("partial", 1)].float(), stored[("full", 1)].float(),
                               rtol=2e-2, atol=2e-2)


def test_row_quota_selection_against_a_direct_loop():
    """select_tokens equals picking, row by row, the q(r) highest scores (a plain loop), and
    the union of the per-rank selections equals the single-rank one (padding rows excluded)."""
    from opensora_duca.cache.selection import TokenGrid, row_quotas, select_tokens

    g = torch.Generator().manual_seed(0)
    T, H, W, ratio = 3, 5, 7, 0.3
    score = torch.rand(2, T * H * W, generator=g)
    grid = TokenGrid(frames=T, rows=H, width=W, local_rows=H, row_offset=0)
    K = round(ratio * H * W)
    expect = []
    for b in range(2):
        chosen = set()
        for t in range(T):
            for r in range(H):
                q = (r + 1) * K // H - r * K // H
                row = score[b].view(T, H, W)[t, r]
                for c in row.topk(q).indices.tolist():
                    chosen.add(t * H * W + r * W + c)
        expect.append(chosen)
    got = select_tokens(score, ratio, grid)
    assert [set(x.tolist()) for x in got] == expect
    assert int(row_quotas(ratio, grid).sum()) == K
    # 2 ranks, rows padded from 5 to 6: rank r holds rows 3r..3r+2 (row 5 is padding)
    union = [set(), set()]
    for rank in range(2):
        lg = TokenGrid(frames=T, rows=H, width=W, local_rows=3, row_offset=3 * rank)
        local = torch.zeros(2, T, 3, W)
        rows_here = list(range(3 * rank, min(3 * rank + 3, H)))
        local[:, :, : len(rows_here)] = score.view(2, T, H, W)[:, :, rows_here]
        idx = select_tokens(local.reshape(2, -1), ratio, lg)
        for b in range(2):
            for i in idx[b].tolist():
                t, rem = divmod(i, 3 * W)
                r, c = divmod(rem, W)
                assert 3 * rank + r < H  # never a padding row
                union[b].add(t * H * W + (3 * rank + r) * W + c)
    assert union == expect


def test_the_block_forward_is_the_definition():
    """A block class with other math (the cross-attention residual halved) is cached through its
    own forward: a full step is bitwise the unpatched model, and reusing everything (or
    recomputing every MLP token) right after it, at the same conditioning, gives the same."""
    from opensora_duca.models.stdit3 import STDiT3Block

    class HalfCrossBlock(STDiT3Block):
        def forward(self, x, y, t, mask=None, x_mask=None, t0=None, T=None, S=None):
            b, n, c = x.shape
            sh1, sc1, g1, sh2, sc2, g2 = (self.scale_shift_table[None]
                                          + t.reshape(b, 6, -1)).chunk(6, dim=1)
            h = self.attn(self.norm1(x).mul(1 + sc1).add(sh1).view(b * T, S, c)) \
                if not self.temporal else self.attn(
                    (self.norm1(x) * (1 + sc1) + sh1).view(b, T, S, c).transpose(1, 2)
                    .reshape(b * S, T, c)).view(b, S, T, c).transpose(1, 2)
            x = x + g1 * h.reshape(b, n, c)
            x = x + 0.5 * self.cross_attn(x, y, mask)
            return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)

    m = small_model()
    for blocks in (m.spatial_blocks, m.temporal_blocks):
        for blk in blocks:
            blk.__class__ = HalfCrossBlock
    with torch.no_grad():
        m.t_embedder.mlp[2].weight.zero_()  # same conditioning at both timesteps
    x, y, mask = inputs()
    t, t_next = torch.full((2,), 700.0), torch.full((2,), 600.0)
    with torch.no_grad():
        ref = m(x, t, y, mask=mask)
    for plan in (plan_of(**{k: REUSE for k in KINDS}),
                 plan_of(spatial_attn=REUSE, temporal_attn=REUSE, cross_attn=REUSE,
                       mlp=(PARTIAL, 1.0))):
        mgr = apply_cache(m, Scripted({1: plan}))
        with mgr.session(num_steps=2), torch.no_grad():
            out0 = m(x, t, y, mask=mask)
            out1 = m(x, t_next, y, mask=mask)
        remove_cache(m)
        assert torch.equal(out0, ref)
        torch.testing.assert_close(out1, ref, rtol=1e-5, atol=1e-5)
