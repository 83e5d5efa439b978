"""The cache plugin on an upstream-shaped STDiT3 (tests/upstream_double.py): packed captions
with per-sample lengths, separate sequence-parallel attention classes, S split in contiguous
chunks, upstream's block signature and op order. Only the public API is used (apply_cache,
remove_cache, get_cache_manager, stats, session)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from dist_utils import observe_collectives, run_distributed
from upstream_double import UpstreamShapedSTDiT3, load_stdit3_state_dict

from opensora_duca.cache import apply_cache, build_policy, get_cache_manager, remove_cache
from opensora_duca.cache.plan import Action, Kind
from opensora_duca.models.stdit3 import STDiT3

STEPS = 10
DEPTH = 2
SIZE = dict(in_channels=4, hidden_size=32, depth=DEPTH, num_heads=4, caption_channels=16,
            model_max_length=8, input_sq_size=64)
X_MASK = torch.tensor([[True, False, True], [False, True, True]])


def weights(seed=0):
    """A state dict of opensora_duca's STDiT3 with every weight random and non-zero."""
    torch.manual_seed(seed)
    m = STDiT3(**SIZE)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "rope.freqs":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.state_dict()


def ours(dtype=torch.float64):
    m = STDiT3(**SIZE)
    m.load_state_dict(weights())
    return m.to(dtype).eval()


def double(dtype=torch.float64, sp=False):
    m = UpstreamShapedSTDiT3(**SIZE, enable_sequence_parallelism=sp)
    load_stdit3_state_dict(m, weights())
    return m.to(dtype).eval()


def inputs(dtype=torch.float64):
    """B = 2 with different caption lengths (5 and 3 of 8); latent 3 x 8 x 10 -> T=3, H=4, W=5."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 10, generator=g, dtype=dtype)
    y = torch.randn(2, 1, 8, 16, generator=g, dtype=dtype)
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 3 + [0] * 5])
    return x, y, mask


def timestep(i):
    return 1000.0 * (1 - i / STEPS)


@torch.no_grad()
def trajectory(model, steps=STEPS, x_mask=None, dtype=torch.float64):
    """Outputs of a loop whose inputs do not depend on the outputs (cached and uncached runs
    see the same inputs); the keywords are those upstream's sampler passes."""
    x, y, mask = inputs(dtype)
    kw = dict(fps=torch.tensor([24.0, 24.0]), height=torch.tensor([64.0, 64.0]),
              width=torch.tensor([80.0, 80.0]), num_frames=torch.tensor([3.0, 3.0]),
              ar=torch.tensor([0.8, 0.8]))
    outs = []
    for i in range(steps):
        t = torch.full((2,), timestep(i), dtype=dtype)
        outs.append(model(x * (1 - i / (2 * steps)), t, y, mask=mask, x_mask=x_mask, **kw))
    return torch.stack(outs)


def cached_trajectory(model, cfg, x_mask=None):
    mgr = apply_cache(model, cfg)
    with mgr.session(num_steps=STEPS):
        out = trajectory(model, x_mask=x_mask)
        stats = mgr.stats()
    remove_cache(model)
    return out, stats


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def plan_labels(cfg):
    policy = build_policy(cfg)
    return [policy.plan(i, STEPS, [timestep(j) for j in range(i + 1)]).label for i in range(STEPS)]


@pytest.mark.parametrize("use_x_mask", [False, True])
def test_double_equals_stdit3_uncached(use_x_mask):
    x_mask = X_MASK if use_x_mask else None
    err = rel_err(trajectory(double(), x_mask=x_mask), trajectory(ours(), x_mask=x_mask))
    assert err < 1e-5, err


def test_none_is_bitwise_identical_and_remove_restores():
    m = double(torch.float32)
    ref = trajectory(m, steps=4, dtype=torch.float32)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    mgr = apply_cache(m, dict(type="none"))
    with mgr.session(num_steps=4):
        out = trajectory(m, steps=4, dtype=torch.float32)
    assert torch.equal(out, ref)
    remove_cache(m)
    assert get_cache_manager(m) is None
    for name, mod in m.named_modules():  # blocks, attn, cross_attn, mlp, ...: nothing left
        assert "forward" not in mod.__dict__, name
        assert not mod._forward_pre_hooks and not mod._forward_hooks, name
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert torch.equal(trajectory(m, steps=4, dtype=torch.float32), ref)


POLICIES = {
    "DuCa": (dict(type="DuCa"), False),
    "DuCa_x_mask": (dict(type="DuCa"), True),
    "ToCa": (dict(type="ToCa"), False),
    "FORA": (dict(type="FORA"), False),
    "PAB": (dict(type="PAB"), False),
    "TrunkReuse": (dict(type="TrunkReuse"), False),
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_follows_its_plan_and_matches_stdit3(name):
    cfg, use_x_mask = POLICIES[name]
    x_mask = X_MASK if use_x_mask else None
    got, stats = cached_trajectory(double(), cfg, x_mask)
    want, want_stats = cached_trajectory(ours(), cfg, x_mask)
    labels = plan_labels(cfg)
    assert stats["step_labels"] == labels == want_stats["step_labels"]
    assert stats["steps_by_kind"] == dict(Counter(labels))
    assert len(set(labels)) > 1  # the plan caches something
    err = rel_err(got, want)
    assert err < 1e-5, f"{name}: double vs STDiT3 under the same policy, rel. error {err}"
    # and the cache changed the output (the comparison above is not of two uncached runs)
    assert rel_err(got, trajectory(double(), x_mask=x_mask)) > 1e-4


# ------------------------------------------------------------------ sequence parallelism
SP_POLICIES = {"DuCa": dict(type="DuCa"), "FORA": dict(type="FORA")}


def _sp_worker(rank, world):
    out = {"uncached": trajectory(double(sp=True))}
    calls = []
    with observe_collectives(lambda name, kw: calls.append(name)):
        for name, cfg in SP_POLICIES.items():
            m = double(sp=True)
            mgr = apply_cache(m, cfg)
            per_step, outs = [], []
            x, y, mask = inputs()
            kw = dict(fps=torch.tensor([24.0, 24.0]), height=torch.tensor([64.0, 64.0]),
                      width=torch.tensor([80.0, 80.0]))
            with mgr.session(num_steps=STEPS), torch.no_grad():
                for i in range(STEPS):
                    calls.clear()
                    t = torch.full((2,), timestep(i), dtype=torch.float64)
                    outs.append(m(x * (1 - i / (2 * STEPS)), t, y, mask=mask, **kw))
                    per_step.append(Counter(calls))
                out[name + ":labels"] = mgr.stats()["step_labels"]
            remove_cache(m)
            out[name] = torch.stack(outs)
            out[name + ":calls"] = per_step
    return out


def expected_collectives(cfg):
    """Per step: two all-to-alls in each spatial block's self-attention and two in its
    cross-attention when that module runs (temporal blocks hold whole time series and need
    none), and the all-gather of the tokens before the final layer."""
    policy = build_policy(cfg)
    want = []
    for i in range(STEPS):
        plan = policy.plan(i, STEPS, [timestep(j) for j in range(i + 1)])
        n = 0
        if not plan.skip_trunk:
            n = DEPTH * (2 * (plan.actions[Kind.SPATIAL_ATTN] == Action.FULL)
                         + 2 * (plan.actions[Kind.CROSS_ATTN] != Action.REUSE))
        want.append(Counter({"all_to_all_single": n, "all_gather": 1}) + Counter())
    return want


def test_two_ranks_equal_one_rank_and_reuse_issues_no_collectives():
    results = run_distributed(_sp_worker, 2)
    single = double(sp=True)
    assert rel_err(results[0]["uncached"], trajectory(single)) < 1e-10
    for name, cfg in SP_POLICIES.items():
        one, stats = cached_trajectory(double(sp=True), cfg)
        for r, res in enumerate(results):
            assert res[name + ":labels"] == stats["step_labels"]
            err = rel_err(res[name], one)
            assert err < 1e-10, f"{name}, rank {r}: 2 ranks vs 1, rel. error {err}"
            assert res[name + ":calls"] == expected_collectives(cfg), name
        assert rel_err(one, trajectory(single)) > 1e-4  # the cache is active
    duca = results[0]["DuCa:labels"]
    assert {"full", "conservative", "aggressive"} <= set(duca)


@pytest.mark.parametrize("use_x_mask", [False, True])
def test_token_sparse_path_on_upstream_layout_equals_block_forward(use_x_mask):
    """Upstream's block class is named STDiT3Block, which takes the runner's token-sparse
    conservative path; the double's ``Block`` runs conservative steps through its own forward.
    Both must give the same DuCa output."""
    from opensora_duca.cache.layouts.stdit3 import TOKEN_SPARSE_BLOCKS

    x_mask = X_MASK if use_x_mask else None
    general, _ = cached_trajectory(double(), dict(type="DuCa"), x_mask)
    m = double()
    sparse_cls = type("STDiT3Block", (type(m.spatial_blocks[0]),), {})
    assert sparse_cls.__name__ in TOKEN_SPARSE_BLOCKS
    for blk in [*m.spatial_blocks, *m.temporal_blocks]:
        blk.__class__ = sparse_cls
    tokens = []
    hook = m.spatial_blocks[0].mlp.fc1.register_forward_hook(
        lambda mod, a, o: tokens.append(a[0].shape[-2]))
    sparse, stats = cached_trajectory(m, dict(type="DuCa"), x_mask)
    hook.remove()
    assert stats["steps_by_kind"].get("conservative", 0) > 0
    assert min(tokens) < 60 // 4  # the MLP ran on gathered tokens only (60 tokens per sample)
    assert rel_err(sparse, general) < 1e-10


def test_per_clip_decisions_on_packed_captions_match_stdit3():
    """Adaptive policies decide per clip; a step where one clip computes and the other takes
    its residual runs the computed clip's blocks on a sub-batch, which cuts upstream's packed
    captions (y [1, sum(y_lens), C], mask = y_lens) to that clip: same as this project's model."""
    cfg = dict(type="FirstBlockCache", threshold=0.875)
    got, stats = cached_trajectory(double(), cfg)
    want, want_stats = cached_trajectory(ours(), cfg)
    assert stats["step_labels"] == want_stats["step_labels"]
    assert "residual reused for some samples" in stats["step_labels"]
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, trajectory(double())) > 1e-4
