"""SpeCa, the verified forecast: its decisions on a scripted error sequence (hand-computed), the
check's error against an independent float64 computation from hooks, the fallback (a check
that always fails computes every step: bitwise the uncached sampler, every failure counted),
and an accepted order-0 draft being exactly First-Block Cache's reused residual."""
from __future__ import annotations

import pytest
import torch
from cache_utils import small_model
from test_cache_batch import clips, sample

from opensora_duca.cache import apply_cache, build_policy, remove_cache


def test_decisions_on_a_scripted_error_sequence():
    pol = build_policy(dict(type="SpeCa", threshold=0.1, max_drafts=2, warmup_steps=1))
    state = pol.new_state()
    errors = [None, 0.05, 0.05, 0.05, 0.2, 0.01, 0.09, 0.1, 0.0, 0.0]
    got, labels = [], []
    for i, e in enumerate(errors):
        got.append(pol.decide(i, 10, e, state))
        labels.append(str(pol.label(got[-1], e, state)))
    # by hand: 0 warm-up; 1, 2 drafts accepted; 3: two drafts in a row (max) -> computed; 4:
    # error .2 >= .1 -> rejected; 5, 6 accepted; 7: error .1 (not < .1) -> rejected; 8
    # accepted; 9 the last step, computed
    assert got == [True, False, False, True, True, False, False, True, False, True]
    assert labels == ["full", "forecast (verified)", "forecast (verified)", "full",
                      "full (forecast rejected)", "forecast (verified)", "forecast (verified)",
                      "full (forecast rejected)", "forecast (verified)", "full"]


@pytest.mark.parametrize("cfg, match", [
    (dict(max_drafts=0), "max_drafts=0"),
    (dict(forecast=dict(order=3)), "forecast.order=3"),
    (dict(forecast=dict(order=1, distance="timestep")), "forecast.distance='timestep'"),
    (dict(threshold="x"), "threshold='x'")])
def test_refusals_are_one_line(cfg, match):
    with pytest.raises(ValueError, match=match) as err:
        build_policy(dict(type="SpeCa", **cfg))
    assert "\n" not in str(err.value)


def _run(model, cfg, steps=6):
    """Two clips' CFG batch [z0, z1, z0, z1] through ``steps`` Euler-like steps -> stats."""
    z, y, y_null, mask = clips()
    z, y, mask = z[:2], y[:2], mask[:2]
    mgr = apply_cache(model, cfg)
    try:
        with torch.no_grad(), mgr.session(num_steps=steps):
            for i in range(steps):
                t = torch.full((4,), 1000.0 * (1 - i / steps))
                out = model(torch.cat([z, z]), t, torch.cat([y, y_null.expand(2, -1, -1, -1)]),
                            mask=torch.cat([mask, mask]))
                z = z + out[:, :4].chunk(2)[0] * 0.1
        return mgr.stats()
    finally:
        remove_cache(model)


def test_check_error_is_the_forecast_error_of_the_first_pair():
    """Order 1, threshold 0 (every check fails, every step computed): at step t >= 2 the error
    of a clip is sum|f_t - r_t| / sum|r_t|, r = the second spatial block's input minus the
    first's (what the first pair added), f_t = r_(t-1) + (r_(t-1) - r_(t-2)) (Taylor order 1
    in the step), over the clip's rows, float64 from hooks."""
    model = small_model(depth=2)
    first, second = [], []
    grab = lambda store: lambda m, a, k: store.append((a[0] if a else k["x"]).double())  # noqa
    h1 = model.spatial_blocks[0].register_forward_pre_hook(grab(first), with_kwargs=True)
    h2 = model.spatial_blocks[1].register_forward_pre_hook(grab(second), with_kwargs=True)
    try:
        st = _run(model, dict(type="SpeCa", threshold=0.0, warmup_steps=0,
                              forecast=dict(order=1)))
    finally:
        h1.remove()
        h2.remove()
    r = [b - a for a, b in zip(first, second)]
    for t, per_group in enumerate(st["changes"]):
        for g, rows in enumerate([[0, 2], [1, 3]]):
            if t == 0:
                assert per_group[g] is None
                continue
            fc = r[t - 1] if t == 1 else 2 * r[t - 1] - r[t - 2]
            want = float((fc[rows] - r[t][rows]).abs().sum() / r[t][rows].abs().sum())
            assert per_group[g] == pytest.approx(want, rel=1e-6, abs=1e-9), (t, g)
    labels = [lab for step in st["group_labels"] for lab in step]
    assert labels.count("full (forecast rejected)") == 2 * 4  # steps 1-4 checked, all failed
    assert st["verify"] == dict(checked=8, failed=8, fail_rate=1.0)


def test_forced_failure_computes_the_step():
    """A check that always fails (threshold 0) computes every step: bitwise the uncached
    sampler; a lenient one accepts drafts and changes the result."""
    model = small_model(depth=3)
    z_plain = sample(model, [0, 1])[0]
    z, dec = sample(model, [0, 1], dict(type="SpeCa", threshold=0.0, forecast=dict(order=2)))
    assert "forecast (verified)" not in dec[0] + dec[1]
    assert "full (forecast rejected)" in dec[0] and torch.equal(z, z_plain)
    z2, dec2 = sample(model, [0, 1], dict(type="SpeCa", threshold=0.5, forecast=dict(order=1)))
    assert "forecast (verified)" in dec2[0] and not torch.equal(z2, z_plain)
    rel = float((z2 - z_plain).abs().max() / z_plain.abs().max())
    assert rel < 0.05, rel


def test_an_accepted_order0_draft_is_first_block_caches_reused_residual():
    """Order 0 with every draft accepted (huge threshold and max_drafts) skips every step after
    the warm-up with the last computed residual, as First-Block Cache with a huge threshold
    does: the same latents, bitwise."""
    model = small_model(depth=3)
    speca = dict(type="SpeCa", threshold=1e9, max_drafts=100, warmup_steps=2,
                 forecast=dict(order=0), final_step="plan")
    fbc = dict(type="FirstBlockCache", threshold=1e9, warmup_steps=2)
    z_s, dec_s = sample(model, [0, 1], speca)
    z_f, dec_f = sample(model, [0, 1], fbc)
    assert dec_s[0] == ["full"] * 2 + ["forecast (verified)"] * 10
    assert dec_f[0] == ["full"] * 2 + ["residual reused"] * 10
    assert torch.equal(z_s, z_f)
