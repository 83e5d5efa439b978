"""The bdf2 forecaster (forecast=dict(method="bdf2", corrector=None|"heun")): its read-out on
hand-computed quadratics (exact BDF2 slope, any spacing; the Heun-corrected value), fewer
anchors, the stores, validation, and a run where it equals the Taylor order 1 forecast while
two anchors exist and departs from it with the third."""
from __future__ import annotations

import pytest
import torch
from cache_utils import inputs, small_model, trajectory

from opensora_duca.cache import apply_cache, build_policy, remove_cache
from opensora_duca.cache.state import Codec, Feature, StoredBytes


def feature(points, corrector=None, dtype=None, shape=(1,)):
    f = Feature(Codec(dtype), StoredBytes(), 2, "bdf2", corrector)
    for a in points:
        f.update(torch.full(shape, float(a * a), dtype=torch.float64), float(a))
    return f


def test_readout_on_quadratics():
    f = feature([0, 1, 2])  # t^2 at 0, 1, 2: the BDF2 slope at 2 is 4 (exact)
    assert f.bdf2_weights(3.0) == [2.5, -2.0, 0.5]
    assert f.value(3.0, torch.float64).item() == 8.0          # 4 + 1 * 4
    assert f.value(2.0, torch.float64).item() == 4.0          # at the anchor: the value
    # Heun: the slope at the prediction (1, 4, 8 at 1, 2, 3) is (3*8 - 4*4 + 1) / 2 = 4.5, so
    # 4 + 1 * (4 + 4.5) / 2 = 8.25
    assert feature([0, 1, 2], "heun").value(3.0, torch.float64).item() == pytest.approx(8.25)
    # uneven spacing, anchors 0, 2, 3: the slope at 3 is 6 (exact), read at 5: 9 + 2 * 6
    assert feature([0, 2, 3]).value(5.0, torch.float64).item() == pytest.approx(21.0)
    # two anchors: the line (1 at 1, 4 at 2 -> 7 at 3); one: the value
    assert feature([1, 2]).value(3.0, torch.float64).item() == pytest.approx(7.0)
    assert feature([2]).value(5.0, torch.float64).item() == 4.0
    # only the last three anchors count, and bytes are three tensors
    many = feature([0, 5, 1, 2], shape=(4, 8))
    assert many.anchors == [2.0, 1.0, 5.0] and many.nbytes == 3 * 4 * 8 * 8
    assert many.counter.current == many.nbytes


def test_stored_in_int8_reads_back_close():
    f = feature([0, 1, 2], dtype="int8", shape=(3, 16))
    assert f.terms[0].data.dtype == torch.int8
    want = torch.full((3, 16), 8.0, dtype=torch.float64)
    assert torch.allclose(f.value(3.0, torch.float64), want, rtol=0.02)


@pytest.mark.parametrize("forecast, match", [
    (dict(method="bdf2", order=1), r"forecast.order=1 is invalid; accepted: 2 or absent"),
    (dict(corrector="heun"), r"forecast.corrector='heun' is invalid; accepted: None with"),
    (dict(method="adams"), r"forecast.method='adams'"),
    (dict(method="bdf2", corrector="rk4"), r"forecast.corrector='rk4'")])
def test_refusals_are_one_line(forecast, match):
    with pytest.raises(ValueError, match=match) as err:
        build_policy(dict(type="FORA", forecast=forecast))
    assert "\n" not in str(err.value)


def test_describe_builds_it_again():
    pol = build_policy(dict(type="DuCa", forecast=dict(method="bdf2", corrector="heun")))
    assert pol.forecast == {"order": 2, "distance": "step", "method": "bdf2",
                            "corrector": "heun"}
    assert build_policy(pol.describe()) == pol
    # the Taylor default keeps its two keys
    assert build_policy(dict(type="FORA")).forecast == {"order": 0, "distance": "step"}


def _run(model, cfg, steps):
    x, y, mask = inputs()
    mgr = apply_cache(model, cfg)
    try:
        with mgr.session(num_steps=steps):
            return trajectory(model, x, y, mask, steps=steps)
    finally:
        remove_cache(model)


@pytest.mark.parametrize("policy", ["FORA", "TrunkReuse", "DuCa"])
def test_two_anchors_are_taylor_order1_and_the_third_departs(policy):
    """Interval 3 (DuCa: its plan): anchors at steps 0, 3, 6 (FORA). Until the third anchor
    the bdf2 read-out is the line through two, as Taylor order 1's; afterwards it is not."""
    model = small_model(depth=2).double()
    cfg = dict(type=policy) if policy == "DuCa" else dict(type=policy, interval=3)
    if policy == "DuCa":
        cfg.update(scorer="random", warmup_steps=1)
    steps = 9
    taylor = _run(model, dict(cfg, forecast=dict(order=1)), steps)
    bdf2 = _run(model, dict(cfg, forecast=dict(method="bdf2")), steps)
    heun = _run(model, dict(cfg, forecast=dict(method="bdf2", corrector="heun")), steps)
    plain = trajectory(model, *inputs(), steps=steps)
    first_third = 6 if policy != "DuCa" else 4  # DuCa warm-up 1, cycle 3: anchors 0, 1, 4
    for i in range(first_third):
        assert torch.allclose(bdf2[i], taylor[i], rtol=0, atol=1e-10), i
        assert torch.allclose(heun[i], taylor[i], rtol=0, atol=1e-10), i
    late = range(first_third + 1, steps)
    assert max(float((bdf2[i] - taylor[i]).abs().max()) for i in late) > 1e-6
    assert max(float((heun[i] - bdf2[i]).abs().max()) for i in late) > 1e-6
    err = max(float((bdf2[i] - plain[i]).abs().max() / plain[i].abs().max()) for i in late)
    assert err < 0.2, err
