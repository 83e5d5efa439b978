"""EasyCache: its decisions on a scripted change sequence (hand-computed), the predicted change
it measures against an independent float64 computation from hooks, and a threshold of 0
computing every step (bitwise the uncached sampler)."""
from __future__ import annotations

import pytest
import torch
from cache_utils import small_model
from test_cache_batch import clips, sample

from opensora_duca.cache import apply_cache, build_policy, remove_cache


def test_decisions_on_a_scripted_change_sequence():
    pol = build_policy(dict(type="EasyCache", threshold=0.1, warmup_steps=3))
    state = pol.new_state()
    changes = [None, 0.5, 0.5, 0.04, 0.05, 0.03, None, 0.2, 0.02, 0.01, 0.5]
    got = [pol.decide(i, 11, c, state) for i, c in enumerate(changes)]
    # by hand: 0-2 warm-up; 3: sum .04 skip; 4: .09 skip; 5: .12 >= .1 compute (reset); 6: no
    # rate -> compute; 7: .2 compute (reset); 8: .02 skip; 9: .03 skip; 10: the last, computed
    assert got == [True] * 3 + [False, False, True, True, True, False, False, True]


@pytest.mark.parametrize("cfg, match", [(dict(threshold=-1), "threshold=-1"),
                                        (dict(warmup_steps=1.5), "warmup_steps=1.5"),
                                        (dict(final_step="x"), "final_step='x'")])
def test_refusals_are_one_line(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_policy(dict(type="EasyCache", **cfg))


def test_measured_change_is_the_rate_times_the_input_change():
    """Threshold 0: every step computed and measured. At step t >= 2 of a clip (its CFG pair
    of rows), the change is k * sum|x_t - x_(t-1)| / sum|o_(t-1)| with k = sum|o_(t-1) -
    o_(t-2)| / sum|x_(t-1) - x_(t-2)|: x the first block's input, o the last block's output,
    sums over the clip's rows in float64, from hooks."""
    model = small_model(depth=2)
    ins, outs = [], []
    h1 = model.spatial_blocks[0].register_forward_pre_hook(
        lambda m, a, k: ins.append((a[0] if a else k["x"]).double()), with_kwargs=True)
    h2 = model.temporal_blocks[-1].register_forward_hook(lambda m, a, o: outs.append(o.double()))
    try:
        mgr_changes = _changes(model, dict(type="EasyCache", threshold=0.0, warmup_steps=0))
    finally:
        h1.remove()
        h2.remove()
    rows = [[0, 2], [1, 3]]  # two clips, CFG batch [z0, z1, z0, z1]
    for t in range(len(ins)):
        for g, r in enumerate(rows):
            got = mgr_changes[t][g]
            if t < 2:
                assert got is None  # no rate yet (fewer than two computed steps)
                continue
            s = lambda v: float(v[r].abs().sum())  # noqa: E731
            k = s(outs[t - 1] - outs[t - 2]) / s(ins[t - 1] - ins[t - 2])
            want = k * s(ins[t] - ins[t - 1]) / s(outs[t - 1])
            assert got == pytest.approx(want, rel=1e-9), (t, g)


def _changes(model, cfg):
    """Two clips' CFG batch through 6 Euler-like steps -> the stats' changes per step."""
    z, y, y_null, mask = clips()
    z, y, mask = z[:2], y[:2], mask[:2]
    mgr = apply_cache(model, cfg)
    try:
        with torch.no_grad(), mgr.session(num_steps=6):
            for i in range(6):
                t = torch.full((4,), 1000.0 * (1 - i / 6))
                out = model(torch.cat([z, z]), t, torch.cat([y, y_null.expand(2, -1, -1, -1)]),
                            mask=torch.cat([mask, mask]))
                z = z + out[:, :4].chunk(2)[0] * 0.1
        return mgr.stats()["changes"]
    finally:
        remove_cache(model)


def test_threshold_zero_is_the_uncached_sampler_and_a_threshold_skips():
    model = small_model(depth=3)
    z_plain = sample(model, [0, 1])[0]
    z_all, dec_all = sample(model, [0, 1], dict(type="EasyCache", threshold=0.0))
    assert all(d == "full" for d in dec_all[0] + dec_all[1]) and torch.equal(z_all, z_plain)
    z, dec = sample(model, [0, 1], dict(type="EasyCache", threshold=0.1))
    assert "residual reused" in dec[0] and dec[0][:3] == ["full"] * 3 and dec[0][-1] == "full"
    rel = float((z - z_plain).abs().max() / z_plain.abs().max())
    assert 0 < rel < 0.05, rel
