"""MagCache, EasyCache and SpeCa as the other adaptive policies are held: a clip alone and in a
batch of 4 decides alike at every step (EasyCache and SpeCa: the clips decide differently at
some step, so a batch-wide decision would show); 2 gloo ranks (sequence parallelism) give the
single process's decisions and latents bitwise (this project's MMDiT sharded by rows: the same
decisions, latents to float rounding); each runs on Open-Sora 2.0's MMDiT (its
three-branch guidance batch: a clip's decisions alone and beside another are the same), bdf2
forecasting too; CFG parallelism: refused where a decision sums over a clip's CFG rows
(EasyCache, SpeCa), accepted for MagCache (its decisions read the step index only)."""
from __future__ import annotations

import pytest
import torch
from cache_utils import small_model
from dist_utils import run_distributed
from test_cache_batch import CLIPS, STEPS, rel, sample
from test_cache_mmdit import NEW_POLICIES, guided, ours, three_branch
from test_cache_mmdit import sample as mmdit_sample
from upstream_mmdit import make_inputs, small_config

from opensora_duca.cache import apply_cache, build_policy, remove_cache
from opensora_duca.parallel.cfg import check_cache_policy

POLICIES = {"magcache": dict(type="MagCache", mag_ratios=[1.0] + [0.97] * (STEPS - 1),
                             threshold=0.2, max_skips=2),
            "easycache": dict(type="EasyCache", threshold=0.1),
            "speca": dict(type="SpeCa", threshold=0.3, forecast=dict(order=1))}
SKIPPED = {"residual reused", "forecast (verified)"}


@pytest.mark.parametrize("name", list(POLICIES))
def test_a_clip_alone_equals_the_clip_in_a_batch(name):
    model = small_model(depth=3)
    everything = list(range(CLIPS))
    z_batch, dec_batch = sample(model, everything, POLICIES[name])
    flat = {lab for d in dec_batch for lab in d}
    assert "full" in flat and flat & SKIPPED
    if name != "magcache":  # adaptive per clip: the clips differ at some step
        assert any(len({d[s] for d in dec_batch}) > 1 for s in range(STEPS))
    z_plain = sample(model, everything)[0]
    for i in everything:
        z_alone, dec_alone = sample(model, [i], POLICIES[name])
        assert dec_alone[0] == dec_batch[i], (name, i)
        noise = rel(sample(model, [i])[0], z_plain[i:i + 1])  # uncached: batch 2 vs 8 rows
        assert rel(z_alone, z_batch[i:i + 1]) <= max(5 * noise, 1e-6), (name, i, noise)


def _ranks(rank, world):
    torch.manual_seed(0)
    model = small_model(depth=3, enable_sequence_parallelism=True)
    return {name: sample(model, list(range(CLIPS)), cfg) for name, cfg in POLICIES.items()}


def test_two_ranks_decide_and_compute_as_one():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = small_model(depth=3)
        one = {name: sample(model, list(range(CLIPS)), cfg) for name, cfg in POLICIES.items()}
    finally:
        torch.set_num_threads(threads)
    for res in run_distributed(_ranks, 2):
        for name in POLICIES:
            assert res[name][1] == one[name][1], name
            assert torch.equal(res[name][0], one[name][0]), name


MMDIT = NEW_POLICIES  # each runs on the MMDiT in tests/test_cache_mmdit.py


@pytest.mark.parametrize("cfg", [dict(MMDIT[1], threshold=2.0), MMDIT[2]],
                         ids=lambda c: c["type"])
def test_a_clip_decides_alone_in_the_mmdit_three_branch_batch(cfg):
    model = ours(2)
    outs, stats = {}, {}
    for rows in ((0,), (0, 1)):
        mgr = apply_cache(model, cfg)
        outs[rows] = guided(model, three_branch(rows))
        stats[rows] = mgr.stats()
        remove_cache(model)
    assert stats[(0, 1)]["groups"] == [[0, 2, 4], [1, 3, 5]]  # a clip's three branches
    alone = [g[0] for g in stats[(0,)]["group_labels"]]
    beside = [g[0] for g in stats[(0, 1)]["group_labels"]]
    assert alone == beside and set(alone) & SKIPPED, alone
    assert float((outs[(0, 1)][:1] - outs[(0,)]).norm() / outs[(0,)].norm()) < 1e-5


def test_cfg_parallelism_where_the_method_allows():
    check_cache_policy(build_policy(POLICIES["magcache"]))  # the step index decides: accepted
    for name in ("easycache", "speca"):
        with pytest.raises(ValueError, match="not accepted with cfg_parallel=2"):
            check_cache_policy(build_policy(POLICIES[name]))


MMDIT_SP = {"magcache": MMDIT[0], "easycache": dict(MMDIT[1], threshold=2.0),
            "speca": MMDIT[2]}


def _mmdit_sp_runs(rank, world_size, sp: bool = True):
    """Each policy on this project's MMDiT (sharded by latent rows when ``sp``): latents and
    per-clip decisions."""
    from test_cache_mmdit import MMDiTConfig, MMDiTModel, build_double

    double = build_double(9)
    model = MMDiTModel(MMDiTConfig(**vars(double.config)), enable_sequence_parallelism=sp)
    model.load_state_dict(double.state_dict())
    model.eval()
    inp = make_inputs(small_config(), grid=(2, 3, 4), txt_len=5, batch=2, seed=13)
    out = {}
    for name, cfg in MMDIT_SP.items():
        mgr = apply_cache(model, cfg)
        got = mmdit_sample(model, inp)
        out[name] = [torch.stack(got), mgr.stats()["group_labels"]]
        remove_cache(model)
    return out


def test_mmdit_two_ranks_give_the_single_process_run():
    single = _mmdit_sp_runs(0, 1, sp=False)
    for r in run_distributed(_mmdit_sp_runs, 2):
        for name in MMDIT_SP:
            labels = {lab for step in single[name][1] for lab in step}
            assert labels & SKIPPED, (name, labels)
            assert r[name][1] == single[name][1], name
            err = float((r[name][0] - single[name][0]).norm() / single[name][0].norm())
            assert err < 1e-5, (name, err)


@pytest.mark.parametrize("name", list(POLICIES))
def test_at_most_one_gather_per_step(name, monkeypatch):
    """The decision's sums travel in one all_gather per step (none for MagCache, whose decisions
    read the step index only); counted where the cache calls it."""
    import opensora_duca.cache.adaptive as adaptive

    calls = []
    real = adaptive.sp.all_gather
    monkeypatch.setattr(adaptive.sp, "all_gather",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model = small_model(depth=3)
    sample(model, [0, 1], POLICIES[name])
    if name == "magcache":
        assert calls == []
    else:
        assert 0 < len(calls) <= STEPS - 1  # step 0 has nothing to compare with
