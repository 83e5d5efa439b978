"""Adaptive policies (TeaCache, FirstBlockCache): decisions that every rank agrees on, for 1, 2
and 4 gloo ranks, with one small collective per step; and the residual reuse itself."""
from __future__ import annotations

import contextlib

import pytest
import torch
from cache_utils import inputs, small_model
from dist_utils import observe_collectives, run_distributed

from opensora_duca.cache import apply_cache, remove_cache

STEPS = 12
CASES = {  # name -> (cache cfg, latent H, W)
    "teacache": (dict(type="TeaCache", threshold=0.15), 8, 10),
    "teacache_padded_rows": (dict(type="TeaCache", threshold=0.15), 6, 10),  # 3 latent rows
    "fbc": (dict(type="FirstBlockCache", threshold=0.15), 8, 10),
}



def _run(sp: bool, cfg, h, w, count=False):
    """Outputs, step labels and measured changes of one run; with ``count``, the collectives
    of every step, split into those inside a block's forward and those outside."""
    m = small_model(depth=3, enable_sequence_parallelism=sp)
    x, y, mask = inputs(h=h, w=w)
    calls, where = [], {"block": None}
    handles = []
    if count:
        order = [b for pair in zip(m.spatial_blocks, m.temporal_blocks) for b in pair]
        for i, blk in enumerate(order):  # i: the index in call order, as plan.decide_at
            handles.append(blk.register_forward_pre_hook(
                lambda mod, a, i=i: where.__setitem__("block", i)))
            handles.append(blk.register_forward_hook(
                lambda mod, a, o: where.__setitem__("block", None)))
    observe = observe_collectives(lambda name, kw: calls.append(where["block"])) if count \
        else contextlib.nullcontext()
    per_step = []
    try:
        with observe:
            mgr = apply_cache(m, cfg)
            with mgr.session(num_steps=STEPS), torch.no_grad():
                outs = []
                for i in range(STEPS):
                    calls.clear()
                    t = torch.full((2,), 1000.0 * (1 - i / STEPS))
                    outs.append(m(x * (1 - i / (2 * STEPS)), t, y, mask=mask))
                    per_step.append(list(calls))
                changes = mgr.stats()["changes"]
                labels = mgr.stats()["step_labels"]
    finally:
        for hd in handles:
            hd.remove()
    remove_cache(m)
    return {"out": torch.stack(outs), "labels": labels, "changes": changes, "calls": per_step}


def _worker(rank, world, names):
    res = {name: _run(True, *CASES[name]) for name in names}
    res["count"] = {name: _run(True, *CASES[name], count=True)["calls"]
                    for name in ("teacache", "fbc")}
    res["count_none"] = _run(True, dict(type="none"), 8, 10, count=True)["calls"]
    return res


@pytest.fixture(scope="module")
def runs():
    single = {name: _run(False, *case) for name, case in CASES.items()}
    multi = {p: run_distributed(_worker, p, list(CASES)) for p in (2, 4)}
    return single, multi


@pytest.mark.parametrize("name", list(CASES))
def test_same_plan_and_output_on_1_2_4_ranks(runs, name):
    single, multi = runs
    ref = single[name]
    assert "residual reused" in ref["labels"] and "full" in ref["labels"]  # it does decide
    for p, results in multi.items():
        for rank, res in enumerate(results):
            got = res[name]
            assert got["labels"] == ref["labels"], (p, rank)
            # every rank of a run measured bit-identical changes (so they cannot disagree)
            assert got["changes"] == results[0][name]["changes"], (p, rank)
            for step_a, step_b in zip(got["changes"], ref["changes"]):  # per decision group
                assert len(step_a) == len(step_b)
                for a, b in zip(step_a, step_b):
                    assert (a is None and b is None) or abs(a - b) <= 1e-9 * max(abs(b), 1e-30)
            torch.testing.assert_close(got["out"], ref["out"], rtol=1e-5, atol=1e-5)


def test_one_collective_per_step_and_none_inside_skipped_blocks(runs):
    _, multi = runs
    for p, results in multi.items():
        base = results[0]["count_none"]
        per_block_none = [c for step in base for c in step if c is not None]
        outside_none = [sum(c is None for c in step) for step in base]
        for name, decide_at in (("teacache", 0), ("fbc", 2)):
            labels = results[0][name]["labels"]
            for step, (calls, label) in enumerate(zip(results[0]["count"][name], labels)):
                outside = sum(c is None for c in calls)
                inside = [c for c in calls if c is not None]
                if label == "full":
                    # the uncached step's collectives, plus the decision's (from the second
                    # step on: the first has nothing to compare with)
                    assert len(calls) == len(base[step]) + (step > 0), (p, name, step)
                else:
                    assert outside == outside_none[step], (p, name, step)
                    # blocks before the decision point as uncached; the measure's all_gather
                    # in the deciding block; nothing in the skipped blocks, or, where some
                    # samples compute the rest (per-sample decisions), the uncached blocks'
                    one_step = per_block_none[: len(per_block_none) // STEPS]
                    before = [c for c in one_step if c < decide_at]
                    if label == "residual reused for some samples":
                        before = one_step
                    assert sorted(inside) == sorted(before + [decide_at]), (p, name, step)


def test_residual_reuse_reproduces_the_full_step_at_unchanged_input():
    """Skipped steps add the stored residual: with the timestep embedding made constant and the
    same input at every step, the measured change is 0, every step after the first is skipped,
    and the output equals the uncached one."""
    m = small_model()
    with torch.no_grad():
        m.t_embedder.mlp[2].weight.zero_()
    x, y, mask = inputs()
    with torch.no_grad():
        ref = m(x, torch.full((2,), 900.0), y, mask=mask)
    for cfg in (dict(type="TeaCache", threshold=0.01, final_step="plan"),
                dict(type="FirstBlockCache", threshold=0.01)):
        mgr = apply_cache(m, cfg)
        with mgr.session(num_steps=4), torch.no_grad():
            outs = [m(x, torch.full((2,), 900.0 - 100 * i), y, mask=mask) for i in range(4)]
            stats = mgr.stats()
        remove_cache(m)
        assert stats["steps_by_kind"] == {"full": 1, "residual reused": 3}, cfg
        assert not mgr.adaptive.holds_state()  # run state freed at the end of the session
        for o in outs:
            torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    # and an adaptive run costs what its computed blocks cost
    full = dict(type="FirstBlockCache", threshold=0.01)
    mgr = apply_cache(m, full)
    with mgr.session(num_steps=4), torch.no_grad():
        for i in range(4):
            m(x, torch.full((2,), 900.0 - 100 * i), y, mask=mask)
        ratio = mgr.stats()["flops_ratio"]
    remove_cache(m)
    depth = len(m.spatial_blocks)
    # 1 full step + 3 steps that compute the first of `depth` block pairs
    assert ratio == pytest.approx(4 / (1 + 3 / depth), rel=0.02)


def test_teacache_calibration_file_and_validation(tmp_path):
    import json

    from opensora_duca.cache import build_policy

    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"coefficients": [2.0, 0.5, 0.0], "x_range": [0.0, 0.2]}))
    pol = build_policy(dict(type="TeaCache", calibration=str(path)))
    assert pol.coefficients == (2.0, 0.5, 0.0) and pol.rescale(0.1) == pytest.approx(0.07)
    assert pol.rescale(0.5) == pytest.approx(pol.rescale(0.2))  # clamped to the fitted range
    assert build_policy(dict(type="TeaCache", coefficients=[1.0, -1.0])).rescale(0.5) == 0.0
    assert build_policy(pol.describe()) == pol
    with pytest.raises(ValueError, match="calibration"):
        build_policy(dict(type="TeaCache", calibration=str(tmp_path / "missing.json")))
    with pytest.raises(ValueError, match="threshold"):
        build_policy(dict(type="FirstBlockCache", threshold=-1))


def test_calibration_fit_recovers_a_known_polynomial():
    import numpy as np

    from opensora_duca.cache.calibrate import fit_polynomial

    rng = np.random.default_rng(0)
    true = [3.0, -2.0, 0.5, 0.01]  # highest degree first
    xs = rng.uniform(0.0, 0.3, 50)
    fit = fit_polynomial(xs, np.polyval(true, xs), 3)
    assert fit["samples"] == 50 and fit["rmse"] < 1e-12
    assert np.allclose(fit["coefficients"], true, atol=1e-8)
    noisy = fit_polynomial(xs, np.polyval(true, xs) + rng.normal(0, 1e-4, 50), 3)
    assert np.allclose(noisy["coefficients"][2:], true[2:], atol=1e-2)
    with pytest.raises(ValueError, match="more than degree=4"):
        fit_polynomial(xs[:4], xs[:4], 4)


def test_calibrate_tool_writes_a_file_teacache_reads(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "cal.json"
    r = subprocess.run([sys.executable, "tools/calibrate.py", "configs/tiny/inference.py",
                        "--seeds", "100", "--degree", "2", "--steps", "6", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    # one point per clip and step >= 1: the config's 2 prompts share the seed's noise, and
    # each is its own clip from the second step on (5 steps x 2 clips)
    assert data["degree"] == 2 and data["samples"] == 10 and len(data["x"]) == 10
    from opensora_duca.cache import build_policy

    pol = build_policy(dict(type="TeaCache", calibration=str(out)))
    assert list(pol.coefficients) == data["coefficients"]
    bad = subprocess.run([sys.executable, "tools/calibrate.py", "configs/tiny/inference.py",
                          "--steps", "1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--steps 1" in bad.stderr
