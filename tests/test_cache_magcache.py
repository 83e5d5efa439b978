"""MagCache: its decisions on a scripted ratio curve (hand-computed), the curve's interpolation,
its one-line refusals, the calibration tool's file, and a cached run that skips where the plan
says and adds the residual it stored."""
from __future__ import annotations

import json

import pytest
import torch
from cache_utils import small_model
from test_cache_batch import sample

from opensora_duca.cache import build_policy
from opensora_duca.cache.calibrate import magnitude_ratios
from opensora_duca.cache.policies.adaptive import DEMO_MAG_RATIOS
from opensora_duca.cli.calibrate import main as calibrate_main

RATIOS = [1.0, 1.0, 0.99, 0.98, 0.97, 0.9, 0.99, 1.0, 1.0, 0.95]


def decisions(policy, num_steps):
    state = policy.new_state()
    return [policy.decide(i, num_steps, None, state) for i in range(num_steps)]


def test_decisions_on_a_scripted_curve():
    pol = build_policy(dict(type="MagCache", mag_ratios=RATIOS, threshold=0.05, max_skips=2,
                            retention_ratio=0.2))
    # by hand: steps 0, 1 retained (0.2 x 10); step 2: ratio .99, error .01 -> skip; step 3:
    # ratio .9702, error .0398, 2 skips -> skip; step 4: ratio .941094, error .098706 >= .05 ->
    # compute (reset); step 5: ratio .9, error .1 -> compute; step 6: .99 / .01 -> skip; step
    # 7: .99 / .02 -> skip; step 8: 3 skips > K=2 -> compute; step 9: the last step, computed
    assert decisions(pol, 10) == [True, True, False, False, True, True, False, False, True, True]
    # K=1: step 3 is a second skip in a row -> computed
    k1 = build_policy(dict(type="MagCache", mag_ratios=RATIOS, threshold=0.05, max_skips=1))
    assert decisions(k1, 10)[:5] == [True, True, False, True, False]
    # final_step="plan": step 9 follows the bound (ratio .95, error .05 -> computed anyway),
    # retention 0.5 keeps steps 0-4
    late = build_policy(dict(type="MagCache", mag_ratios=RATIOS, threshold=0.5,
                             retention_ratio=0.5, final_step="plan"))
    assert decisions(late, 10) == [True] * 5 + [False, False, True, False, False]
    # the error adds |1 - running product|, not |1 - this step's ratio|: steps 1-3 skip (errors
    # 0, .02, .0596); step 4's product .941192 brings it to .118408 >= .07 -> computed (per
    # step ratios would sum .06 and skip)
    prod = build_policy(dict(type="MagCache", mag_ratios=[1.0, 1.0, 0.98, 0.98, 0.98],
                             threshold=0.07, max_skips=5, final_step="plan"))
    assert decisions(prod, 5) == [True, False, False, False, True]


def test_without_a_calibration_the_demo_models_curve():
    pol = build_policy(dict(type="MagCache"))
    assert pol.mag_ratios == DEMO_MAG_RATIOS and len(DEMO_MAG_RATIOS) == 30
    assert build_policy(pol.describe()) == pol
    # on it, the defaults (threshold .12, K 2, 6 retained steps): steps 0-5 and 29 computed,
    # never three skips in a row, about half the steps skipped
    got = decisions(pol, 30)
    assert got[:6] == [True] * 6 and got[-1] is True and 8 <= got.count(False) <= 16
    assert all(any(got[i:i + 3]) for i in range(28))


def test_curve_interpolates_for_another_step_count():
    pol = build_policy(dict(type="MagCache", mag_ratios=[1.0, 0.8, 0.6, 0.4, 0.2]))
    assert pol.curve(3, 5) == 0.4 and pol.curve(3, None) == 0.4
    assert pol.curve(1, 9) == pytest.approx(0.9)       # 1/8 of 4 -> between 1.0 and 0.8
    assert pol.curve(4, 9) == pytest.approx(0.6)       # the middle
    assert pol.curve(8, 9) == pytest.approx(0.2)       # the end


@pytest.mark.parametrize("cfg, match", [
    (dict(mag_ratios=[1.0]), r"mag_ratios=\[1.0\] is invalid"),
    (dict(mag_ratios=[1.0, -0.5]), r"finite positive"),
    (dict(mag_ratios=[1.0, 1.0], max_skips=0), r"max_skips=0 is invalid"),
    (dict(mag_ratios=[1.0, 1.0], retention_ratio=1.5), r"retention_ratio=1.5"),
    (dict(calibration="/nonexistent.json"), r"calibration='/nonexistent.json' is invalid"),
])
def test_refusals_are_one_line(cfg, match):
    with pytest.raises(ValueError, match=match) as err:
        build_policy(dict(type="MagCache", **cfg))
    assert "\n" not in str(err.value)


def test_calibration_file_from_the_tool(tmp_path):
    out = tmp_path / "mag.json"
    threads = torch.get_num_threads()
    try:
        assert calibrate_main(["configs/tiny/inference.py", "--policy", "MagCache", "--seeds",
                               "100", "--steps", "5", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert data["policy"] == "MagCache" and len(data["mag_ratios"]) == 5
    assert data["mag_ratios"] == magnitude_ratios(data["per_clip"])
    pol = build_policy(dict(type="MagCache", calibration=str(out)))
    assert list(pol.mag_ratios) == data["mag_ratios"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"coefficients": [1.0]}))  # a TeaCache file
    with pytest.raises(ValueError, match="'mag_ratios' list"):
        build_policy(dict(type="MagCache", calibration=str(bad)))


def test_magnitude_ratios_mean_over_clips():
    assert magnitude_ratios([[9.0, 1.0, 0.5], [9.0, 0.5, 1.5]]) == [1.0, 0.75, 1.0]
    with pytest.raises(ValueError, match="same number"):
        magnitude_ratios([[1.0, 1.0], [1.0]])


def test_run_skips_where_the_plan_says_with_the_stored_residual():
    """12 steps, ratios 0.99: retention 2, then skip, skip, compute (3 in a row > K=2) three
    times, the last step computed. A skipped step's trunk output is its trunk input plus the
    residual (output minus input) of the last computed step, read from hooks on the first and
    last blocks."""
    model = small_model(depth=3)
    cfg = dict(type="MagCache", mag_ratios=[1.0] + [0.99] * 11, threshold=0.5, max_skips=2,
               retention_ratio=0.2)
    ins, outs = [], []
    h1 = model.spatial_blocks[0].register_forward_pre_hook(
        lambda m, a, k: ins.append((a[0] if a else k["x"]).clone()), with_kwargs=True)
    h2 = model.temporal_blocks[-1].register_forward_hook(lambda m, a, o: outs.append(o.clone()))
    try:
        z, dec = sample(model, [0, 1], cfg)
    finally:
        h1.remove()
        h2.remove()
    expected = ["full"] * 2 + (["residual reused"] * 2 + ["full"]) * 3 + ["full"]
    assert dec[0] == dec[1] == expected  # the same for every clip: no measurement
    last = None
    for i, label in enumerate(expected):
        if label == "full":
            last = outs[i] - ins[i]  # the trunk's residual at a computed step
        else:  # a skipped step: its trunk input plus that residual
            assert torch.allclose(outs[i], ins[i] + last, atol=1e-6), i
    z_plain = sample(model, [0, 1])[0]
    assert not torch.equal(z, z_plain)
    # a threshold of 0 computes every step: bitwise the uncached sampler
    z_all, dec_all = sample(model, [0, 1], dict(cfg, threshold=0.0))
    assert all(d == "full" for d in dec_all[0]) and torch.equal(z_all, z_plain)
