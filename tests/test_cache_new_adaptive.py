"""MagCache, EasyCache and SpeCa as the other adaptive policies are held (a clip alone and in a
batch of 4 decides alike, 2 gloo ranks give one process's run bitwise: tests/test_cache_batch.py);
on this project's MMDiT sharded by rows, 2 and 4 ranks give the same decisions, latents to
float rounding (tests/test_cache_mmdit.py); each runs on Open-Sora 2.0's MMDiT (its
three-branch guidance batch: a clip's decisions alone and beside another are the same), bdf2
forecasting too; CFG parallelism: refused where a decision sums over a clip's CFG rows
(EasyCache, SpeCa), accepted for MagCache (its decisions read the step index only)."""
from __future__ import annotations

import pytest
from cache_utils import small_model
from test_cache_batch import NEW_POLICIES as POLICIES
from test_cache_batch import SKIPPED, STEPS, sample
from test_cache_mmdit import NEW_POLICIES, guided, ours, three_branch

from opensora_duca.cache import apply_cache, build_policy, remove_cache
from opensora_duca.parallel.cfg import check_cache_policy

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
