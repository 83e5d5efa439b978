"""VerifiedDuCa: DuCa's dual schedule with forecasting, the trunk's forecast anchored at fully
computed steps only, and a per-clip check at the conservative steps (the recomputed MLP tokens
against their forecast) whose failure computes the clip's next aggressive step.

Checked against independent references: the aggressive step's output against a float64 Taylor
extrapolation of the last block's outputs at the two previous full steps (hooks); a fallback
step's rows against the unpatched model called on the same inputs; a clip alone against the
clip in a batch (decisions equal, output within the uncached model's own batch rounding); two
ranks against one (bitwise)."""
from __future__ import annotations

import pytest
import torch
from cache_utils import small_model
from dist_utils import run_distributed
from test_cache_batch import CLIPS, STEPS, clips, rel, sample

from opensora_duca.cache import apply_cache, build_policy, remove_cache

BASE = dict(type="VerifiedDuCa", warmup_steps=2)


@pytest.mark.parametrize("cfg, match", [
    (dict(forecast=dict(order=0)), "forecast="),
    (dict(forecast=dict(order=1, distance="timestep")), "forecast.distance='timestep'"),
    (dict(verify_threshold=0), "verify_threshold=0"),
    (dict(verify_threshold="x"), "verify_threshold='x'"),
    (dict(verify_threshold=True), "verify_threshold=True")])
def test_refusals_are_one_line(cfg, match):
    with pytest.raises(ValueError, match=match) as err:
        build_policy(dict(type="VerifiedDuCa", **cfg))
    assert "\n" not in str(err.value)


def test_defaults_are_duca_with_first_order_forecast():
    pol, duca = build_policy(dict(type="VerifiedDuCa")), build_policy(dict(type="DuCa"))
    assert pol.forecast == {"order": 1, "distance": "step"} and pol.verify_threshold is None
    assert all(pol.plan(s, 30, []) == duca.plan(s, 30, []) for s in range(30))
    assert not pol.couples_cfg_halves  # no threshold: nothing decided per clip
    assert build_policy(dict(type="VerifiedDuCa", verify_threshold=0.1)).couples_cfg_halves


def _last_block_outputs(model, cfg):
    """Sample the 4 clips with ``cfg``; -> (the last block's output per step, step labels)."""
    outs = []
    last = model.temporal_blocks[-1]
    h = last.register_forward_hook(lambda m, a, o: outs.append(o.detach().double().clone()))
    try:
        mgr = apply_cache(model, cfg)
        try:
            z, y, y_null, mask = clips()
            with torch.no_grad(), mgr.session(num_steps=STEPS):
                for i in range(STEPS):
                    t = torch.full((2 * CLIPS,), 1000.0 * (1 - i / STEPS))
                    out = model(torch.cat([z, z]), t, torch.cat([y, y_null.expand(CLIPS, -1, -1,
                                                                                  -1)]),
                                mask=torch.cat([mask, mask]))
                    c, u = out[:, :4].chunk(2)
                    z = z + (u + 4.0 * (c - u)) * (1.0 / STEPS)
            labels = mgr.stats()["step_labels"]
        finally:
            remove_cache(model)
    finally:
        h.remove()
    return outs, labels


def test_the_trunk_forecast_is_anchored_at_full_steps_only():
    """Every aggressive step's trunk output is o_f + (s - f) (o_f - o_f') / (f - f') with f' < f
    the two latest steps that computed every module (float64 from hooks); DuCa with the same
    forecast anchors at the conservative step too and differs."""
    model = small_model(depth=2)
    outs, labels = _last_block_outputs(model, BASE)
    anchors = [s for s, lab in enumerate(labels) if lab.startswith("full")]
    aggressive = [s for s, lab in enumerate(labels) if lab == "aggressive"]
    assert aggressive and "conservative" in labels
    for s in aggressive:
        f1, f0 = [a for a in anchors if a < s][-2:][::-1]
        want = outs[f1] + (s - f1) * (outs[f1] - outs[f0]) / (f1 - f0)
        assert rel(outs[s], want) < 1e-5, s
    duca, _ = _last_block_outputs(model, dict(type="DuCa", warmup_steps=2,
                                              forecast=dict(order=1)))
    s = next(s for s in aggressive if labels[s - 1] == "conservative")
    assert rel(duca[s], outs[s]) > 1e-4  # anchored at the conservative step s - 1 as well


@pytest.mark.parametrize("aggressive", ["trunk", "modules"])
def test_a_failed_check_computes_the_clips_aggressive_step(aggressive):
    """verify_threshold tiny: every check fails, every aggressive step computes every clip's
    trunk on its rows: the model's output there equals the unpatched model's on the same
    inputs; a huge threshold never fails and is bitwise the run without checks."""
    model = small_model(depth=2)
    calls = []
    h = model.register_forward_hook(
        lambda m, a, k, o: calls.append((a, dict(k), o.detach().clone())), with_kwargs=True)
    try:
        z_fail, dec = sample(model, list(range(CLIPS)),
                             dict(BASE, verify_threshold=1e-12, aggressive=aggressive))
    finally:
        h.remove()
    for d in dec:  # an aggressive step forecasts only before the run's first check
        first = d.index("conservative (check failed)")
        assert set(d[:first]) == {"aggressive"} and "conservative (check passed)" not in d
        assert set(d[first:]) == {"conservative (check failed)", "full (forecast rejected)"}
    pol = build_policy(dict(BASE, aggressive=aggressive))
    kinds = [str(pol.plan(s, STEPS, []).label) for s in range(STEPS)]
    checked = 0
    with torch.no_grad():
        for s, (args, kwargs, out) in enumerate(calls):
            since_full = kinds[max(k for k in range(s + 1) if kinds[k].startswith("full")):s]
            if kinds[s] in ("aggressive", "forecast") and "conservative" in since_full:
                ref = model(*args, **kwargs)
                assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), s
                checked += 1
    assert checked >= 2
    z_never, dec_never = sample(model, list(range(CLIPS)),
                                dict(BASE, verify_threshold=1e9, aggressive=aggressive))
    z_plain, dec_plain = sample(model, list(range(CLIPS)), dict(BASE, aggressive=aggressive))
    assert torch.equal(z_never, z_plain)
    assert not torch.equal(z_fail, z_plain)


def _errors(model, aggressive):
    """Every clip's check errors in a run without fallbacks (a threshold never reached; to place
    a threshold between clips)."""
    mgr = apply_cache(model, dict(BASE, aggressive=aggressive, verify_threshold=1e9))
    try:
        z, y, y_null, mask = clips()
        with torch.no_grad(), mgr.session(num_steps=STEPS):
            for i in range(STEPS):
                t = torch.full((2 * CLIPS,), 1000.0 * (1 - i / STEPS))
                out = model(torch.cat([z, z]), t,
                            torch.cat([y, y_null.expand(CLIPS, -1, -1, -1)]),
                            mask=torch.cat([mask, mask]))
                c, u = out[:, :4].chunk(2)
                z = z + (u + 4.0 * (c - u)) * (1.0 / STEPS)
        return [e for step in mgr.stats()["changes"] for e in step]
    finally:
        remove_cache(model)


def _mixed_cfg(model, aggressive):
    errs = sorted(_errors(model, aggressive))  # about half the checks fail
    return dict(BASE, verify_threshold=errs[len(errs) // 2], aggressive=aggressive)


@pytest.mark.parametrize("aggressive", ["trunk", "modules"])
def test_a_clip_alone_equals_the_clip_in_a_batch(aggressive):
    """With a threshold that some clips' checks pass and others' fail at the same step, each
    clip alone takes the decisions it takes in the batch of 4, and its latents differ only by
    the uncached model's own rounding between batch sizes."""
    model = small_model(depth=3)
    cfg = _mixed_cfg(model, aggressive)
    everything = list(range(CLIPS))
    z_batch, dec_batch = sample(model, everything, cfg)
    assert any(len({d[s] for d in dec_batch}) > 1 for s in range(len(dec_batch[0])))
    flat = {lab for d in dec_batch for lab in d}
    assert {"aggressive", "full (forecast rejected)"} <= flat
    z_plain = sample(model, everything)[0]
    for i in everything:
        z_alone, dec_alone = sample(model, [i], cfg)
        assert dec_alone[0] == dec_batch[i], i
        noise = rel(sample(model, [i])[0], z_plain[i:i + 1])
        assert rel(z_alone, z_batch[i:i + 1]) <= max(5 * noise, 1e-6), (i, noise)


def _ranks(rank, world, cfg):
    torch.manual_seed(0)
    model = small_model(depth=3, enable_sequence_parallelism=True)
    return sample(model, list(range(CLIPS)), cfg)


@pytest.mark.parametrize("aggressive", ["trunk", "modules"])
def test_two_ranks_check_and_compute_as_one(aggressive):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = small_model(depth=3)
        cfg = _mixed_cfg(model, aggressive)
        one = sample(model, list(range(CLIPS)), cfg)
    finally:
        torch.set_num_threads(threads)
    flat = {lab for d in one[1] for lab in d}
    assert {"aggressive", "full (forecast rejected)"} <= flat
    for z, dec in run_distributed(_ranks, 2, cfg):
        assert dec == one[1]
        assert torch.equal(z, one[0])


def test_no_threshold_computes_no_check():
    """verify_threshold=None: nothing reads the check, so none is computed (no collective, no
    host sync, nothing logged); a threshold never reached logs every check."""
    model = small_model(depth=2)
    dec = sample(model, list(range(CLIPS)), BASE)[1]
    assert {lab for d in dec for lab in d} == {"aggressive"}
    dec_huge = sample(model, list(range(CLIPS)), dict(BASE, verify_threshold=1e9))[1]
    assert "conservative (check passed)" in dec_huge[0]
    assert [lab for lab in dec_huge[0] if lab == "aggressive"] == dec[0]


@pytest.mark.parametrize("aggressive", ["trunk", "modules"])
def test_stats_count_checks_and_fallbacks(aggressive):
    """Counts, and the FLOPs of a fallback step: the rows' full trunk (all rows here) on top
    of the plan's (nothing for a skipped trunk or forecast modules)."""
    model = small_model(depth=2)
    mgr = apply_cache(model, dict(BASE, verify_threshold=1e-12, aggressive=aggressive))
    try:
        z, y, y_null, mask = clips()
        z, y, mask = z[:2], y[:2], mask[:2]
        with torch.no_grad(), mgr.session(num_steps=STEPS):
            for i in range(STEPS):
                t = torch.full((4,), 1000.0 * (1 - i / STEPS))
                model(torch.cat([z, z]), t, torch.cat([y, y_null.expand(2, -1, -1, -1)]),
                      mask=torch.cat([mask, mask]))
        st = mgr.stats()
    finally:
        remove_cache(model)
    conservative = st["step_labels"].count("conservative")
    mixed = st["step_labels"].count("aggressive (some clips computed)")
    assert conservative >= 2 and mixed >= 2
    # one check per clip and conservative step; every one failed; each aggressive step after
    # a failed check computed both clips
    assert st["verify"] == dict(checked=2 * conservative, failed=2 * conservative,
                                fail_rate=1.0, fallback_steps=2 * mixed)
    assert st["flops_ratio"] > 1.0
    full = st["step_flops"][0]
    for lab, f in zip(st["step_labels"], st["step_flops"]):
        if lab == "aggressive (some clips computed)":
            assert f == pytest.approx(full, rel=1e-12)


def test_modules_aggressive_forecasts_every_module_and_skips_nothing():
    """aggressive="modules": the aggressive steps run the trunk with every module forecast
    (FORA's forecast step), zero FLOPs, no trunk output stored; the plans are DuCa's
    otherwise."""
    pol = build_policy(dict(type="VerifiedDuCa", aggressive="modules"))
    duca = build_policy(dict(type="DuCa"))
    assert not pol.skips_trunk()
    for s in range(30):
        p, d = pol.plan(s, 30, []), duca.plan(s, 30, [])
        if d.skip_trunk:
            assert not p.skip_trunk and set(p.actions.values()) == {"reuse"}
            assert p.label == "forecast"
        else:
            assert p == d
