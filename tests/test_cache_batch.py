"""A clip never depends on its batch-mates: the adaptive policies (TeaCache, FirstBlockCache;
MagCache, EasyCache and SpeCa too, whose own tests are tests/test_cache_new_adaptive.py) decide
per clip (its classifier-free-guidance copies decide together, measured on their own
rows), compute the rest of the trunk for the clips that need it (a sub-batch) and give the
others their stored residuals. Each clip alone and in a batch of 4 takes the same decision at
every step; its output differs only by the float rounding the uncached model itself shows
between a batch of 2 and one of 8 rows (its matrix products take another kernel path for 2
rows on this CPU, so bitwise equality across batch sizes is not the model's to give); on 2 ranks
a batch gives bitwise what it gives on one."""
from __future__ import annotations

import pytest
import torch
from cache_utils import small_model
from dist_utils import run_distributed

from opensora_duca.cache import apply_cache, remove_cache

STEPS = 12
CLIPS = 4
POLICIES = {"teacache": dict(type="TeaCache", threshold=0.12),
            "fbc": dict(type="FirstBlockCache", threshold=0.2)}
NEW_POLICIES = {"magcache": dict(type="MagCache", mag_ratios=[1.0] + [0.97] * (STEPS - 1),
                                 threshold=0.2, max_skips=2),
                "easycache": dict(type="EasyCache", threshold=0.1),
                "speca": dict(type="SpeCa", threshold=0.3, forecast=dict(order=1))}
ALL_POLICIES = {**POLICIES, **NEW_POLICIES}
SKIPPED = {"residual reused", "forecast (verified)"}
# the labels a step that skips takes, per policy
SKIP_LABELS = {name: {"residual reused"} if name in POLICIES else SKIPPED
               for name in ALL_POLICIES}


def clips():
    g = torch.Generator().manual_seed(11)
    z = torch.randn(CLIPS, 4, 3, 8, 10, generator=g)
    y = torch.randn(CLIPS, 1, 8, 32, generator=g) * torch.tensor([0.5, 1.0, 2.0, 3.0])[
        :, None, None, None]
    y_null = torch.randn(1, 1, 8, 32, generator=g)
    mask = torch.ones(CLIPS, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return z, y, y_null, mask


@torch.no_grad()
def sample(model, rows, cfg=None, sp=False, same_noise=False):
    """A CFG sampler on the clips ``rows``: batch [z, z], captions [y, y_null], Euler steps
    (``same_noise``: every clip starts from clip 0's noise, as a batch of captions with one
    seed); -> (latents, per step the decisions of each clip)."""
    z, y, y_null, mask = clips()
    if same_noise:
        z = z[:1].expand_as(z).clone()
    z, y, mask = z[rows], y[rows], mask[rows]
    n = len(rows)
    y_in = torch.cat([y, y_null.expand(n, -1, -1, -1)])
    mgr = apply_cache(model, cfg) if cfg is not None else None
    decisions = []
    try:
        ctx = mgr.session(num_steps=STEPS) if mgr is not None else _nothing()
        with ctx:
            for i in range(STEPS):
                t = torch.full((2 * n,), 1000.0 * (1 - i / STEPS))
                out = model(torch.cat([z, z]), t, y_in, mask=torch.cat([mask, mask]))
                c, u = out[:, :4].chunk(2)
                z = z + (u + 4.0 * (c - u)) * (1.0 / STEPS)
            if mgr is not None:
                st = mgr.stats()
                assert st["groups"] == [[j, j + n] for j in range(n)]  # a clip's CFG pair
                # (a first step from one noise: one group, parted at the second step)
                decisions = [[step[j] if len(step) == n else step[0]
                              for step in st["group_labels"]] for j in range(n)]
    finally:
        if mgr is not None:
            remove_cache(model)
    return z, decisions


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(ALL_POLICIES))
def test_a_clip_alone_equals_the_clip_in_a_batch(name):
    model = small_model(depth=3)
    everything = list(range(CLIPS))
    z_batch, dec_batch = sample(model, everything, ALL_POLICIES[name])
    flat = {lab for d in dec_batch for lab in d}
    assert "full" in flat and flat & SKIP_LABELS[name]
    if name != "magcache":  # (its decisions read the step index only)
        # the clips decide differently at some step: a batch-wide decision would change some
        assert any(len({d[s] for d in dec_batch}) > 1 for s in range(STEPS))
    z_plain = sample(model, everything)[0]
    for i in everything:
        z_alone, dec_alone = sample(model, [i], ALL_POLICIES[name])
        assert dec_alone[0] == dec_batch[i], (name, i)
        noise = rel(sample(model, [i])[0], z_plain[i:i + 1])  # uncached: batch 2 vs 8 rows
        assert rel(z_alone, z_batch[i:i + 1]) <= max(5 * noise, 1e-6), (name, i, noise)


def _ranks(rank, world):
    torch.manual_seed(0)
    model = small_model(depth=3, enable_sequence_parallelism=True)
    return {name: sample(model, list(range(CLIPS)), cfg) for name, cfg in ALL_POLICIES.items()}


def test_two_ranks_decide_and_compute_as_one():
    """Same batch on 2 ranks and on one (one thread each, as the workers run): the same
    decisions and bitwise the same latents."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = small_model(depth=3)
        one = {name: sample(model, list(range(CLIPS)), cfg)
               for name, cfg in ALL_POLICIES.items()}
    finally:
        torch.set_num_threads(threads)
    for res in run_distributed(_ranks, 2):
        for name in ALL_POLICIES:
            assert res[name][1] == one[name][1], name
            assert torch.equal(res[name][0], one[name][0]), name


def test_shared_cfg_selection_refuses_a_three_way_batch():
    """cfg_shared_selection pairs the halves of a two-way CFG batch; a three-way batch [z, z, z]
    (Open-Sora 1.3 i2v) of 2 clips (6 rows, even) would pair the wrong rows: refused."""
    model = small_model()
    z, y, y_null, mask = clips()
    cfg = dict(type="DuCa", scorer="random", cfg_shared_selection=True, warmup_steps=1)
    for copies, ok in ((2, True), (3, False)):
        x = torch.cat([z[:2]] * copies)
        caption = y[:1].expand(x.shape[0], -1, -1, -1)
        mgr = apply_cache(model, cfg)
        try:
            with torch.no_grad(), mgr.session(num_steps=2):
                if ok:
                    for i in range(2):
                        model(x, torch.full((x.shape[0],), 900.0 - 100 * i), caption)
                else:
                    with pytest.raises(ValueError, match="groups of \\[3\\].*three-way"):
                        model(x, torch.full((x.shape[0],), 900.0), caption)
        finally:
            remove_cache(model)


@pytest.mark.parametrize("name", list(POLICIES))
def test_clips_from_the_same_noise_decide_apart(name):
    """Captions sampled with one seed start from identical latents; their first step moves them
    apart, and from then on each clip decides on its own rows: alone or beside the others, the
    same decisions and latents (the batch's own rounding)."""
    model = small_model(depth=3)
    z_batch, dec_batch = sample(model, list(range(CLIPS)), POLICIES[name], same_noise=True)
    assert len({tuple(d) for d in dec_batch}) > 1  # the captions do decide differently
    for j in range(CLIPS):
        z_one, dec_one = sample(model, [j], POLICIES[name], same_noise=True)
        assert dec_one[0] == dec_batch[j], (j, dec_one[0], dec_batch[j])
        assert rel(z_batch[j:j + 1], z_one) < 1e-5
