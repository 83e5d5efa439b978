"""Forecasting (Taylor expansion of stored features) and the stored-feature codecs."""
from __future__ import annotations

import math

import pytest
import torch
from cache_utils import inputs, small_model, trajectory

from opensora_duca.cache import apply_cache, build_policy, remove_cache
from opensora_duca.cache.state import Codec, Feature, StoredBytes


@pytest.mark.parametrize("stored_dtype", [None, "fp32"])
def test_first_order_forecast_of_a_linear_feature_is_exact(stored_dtype):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    f = Feature(Codec(stored_dtype), StoredBytes(), order=1)
    f.update(a + 2.0 * b, 2.0)
    assert torch.equal(f.value(7.0, torch.float32), a + 2.0 * b)  # one anchor: plain reuse
    f.update(a + 5.0 * b, 5.0)
    for at in (6.0, 7.5, 11.0):
        torch.testing.assert_close(f.value(at, torch.float32), a + at * b, rtol=1e-5, atol=1e-5)


def test_second_order_forecast_follows_the_difference_formula_and_counts_bytes():
    """Order 2 from three anchors: D1 and D2 are backward differences; the forecast is
    D0 + D1 d + D2 d^2 / 2 (written out here independently), exact on a straight line."""
    g = torch.Generator().manual_seed(1)
    c0, c1, c2 = (torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    q = lambda s: c0 + c1 * s + c2 * s * s  # noqa: E731
    counter = StoredBytes()
    f = Feature(Codec(None), counter, order=2)
    for s in (0.0, 2.0, 5.0):  # uneven gaps, as DuCa's and the timestep's are
        f.update(q(s), s)
    assert len(f.terms) == 3 and counter.current == 3 * c0.numel() * 8
    for at in (6.0, 9.0):
        d = at - 5.0
        d1, d1_prev = (q(5.0) - q(2.0)) / 3, (q(2.0) - q(0.0)) / 2
        d2 = (d1 - d1_prev) / 3
        expect = q(5.0) + d1 * d + d2 * d * d / 2
        torch.testing.assert_close(f.value(at, torch.float64), expect, rtol=1e-12, atol=1e-12)
    f.clear()
    assert counter.current == 0
    for s in (0.0, 2.0, 5.0):
        f.update(c0 + c1 * s, s)
    torch.testing.assert_close(f.value(8.0, torch.float64), c0 + 8 * c1, rtol=1e-12, atol=1e-12)


def test_fp8_codec_accuracy_and_size():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 30, 64, generator=g) * torch.linspace(0.01, 10, 30)[None, :, None]
    codec = Codec("fp8")
    e = codec.encode(x)
    assert e.nbytes == x.numel() + 2 * 30 * 4  # one byte per value, one fp32 scale per token
    back = codec.decode(e, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of each token's largest magnitude
    err = (back - x).abs() / x.abs().amax(-1, keepdim=True)
    assert float(err.max()) <= 2 ** -4
    assert float((back - x).norm() / x.norm()) < 0.03
    # scatter of recomputed tokens encodes them with their own scale
    idx = torch.tensor([[0, 29], [5, 7]])
    src = torch.full((2, 2, 64), 1000.0)
    codec.scatter_(e, idx, src)
    out = codec.decode(e, torch.float32)
    assert torch.equal(out[0, 29], torch.full((64,), 1000.0)) and torch.equal(out[1, 3], back[1, 3])


def test_order_zero_is_reuse_bitwise_against_output_freezing_hooks():
    """FORA with forecast order 0 equals an independent reuse: forward hooks that replace every
    attention / cross-attention / MLP output by the one of the last full step. The blocks are
    given another class name, so both run the block's own forward (no token-sparse path)."""
    from opensora_duca.models.stdit3 import STDiT3Block

    m = small_model()
    plain = type("PlainBlock", (STDiT3Block,), {})
    blocks = [*m.spatial_blocks, *m.temporal_blocks]
    for blk in blocks:
        blk.__class__ = plain
    x, y, mask = inputs()
    steps, interval = 7, 3
    frozen, handles, state = {}, [], {"step": 0}

    def hook(name):
        def fn(mod, args, out):
            if state["step"] % interval == 0:
                frozen[name] = out
                return None
            return frozen[name]
        return fn

    for i, blk in enumerate(blocks):
        for attr in ("attn", "cross_attn", "mlp"):
            handles.append(getattr(blk, attr).register_forward_hook(hook((i, attr))))
    ref = []
    with torch.no_grad():
        for i in range(steps):
            state["step"] = i
            ref.append(m(x * (1 - i / (2 * steps)), torch.full((2,), 1000.0 * (1 - i / steps)),
                         y, mask=mask))
    for h in handles:
        h.remove()
    for forecast in (None, dict(order=0), dict(order=0, distance="timestep")):
        cfg = dict(type="FORA", interval=interval)
        if forecast is not None:
            cfg["forecast"] = forecast
        mgr = apply_cache(m, cfg)
        with mgr.session(num_steps=steps):
            out = trajectory(m, x, y, mask, steps=steps)
        remove_cache(m)
        assert all(torch.equal(a, b) for a, b in zip(out, ref)), forecast


@pytest.mark.parametrize("cfg", [
    dict(type="DuCa", forecast=dict(order=1)),
    dict(type="FORA", forecast=dict(order=2, distance="timestep")),
    dict(type="TrunkReuse", forecast=dict(order=1)),
    dict(type="TaylorSeer", interval=3, warmup_steps=2),
])
def test_forecasting_policies_run_store_more_and_change_the_output(cfg):
    m = small_model()
    x, y, mask = inputs()
    reuse_cfg = {k: v for k, v in cfg.items() if k not in ("forecast", "order")}
    if cfg["type"] == "TaylorSeer":
        reuse_cfg = dict(type="FORA", interval=3, warmup_steps=2)
    results = {}
    for name, c in (("reuse", reuse_cfg), ("forecast", cfg)):
        mgr = apply_cache(m, c)
        with mgr.session(num_steps=10):
            out = trajectory(m, x, y, mask, steps=10)
            stats = mgr.stats()
        remove_cache(m)
        results[name] = (out, stats)
    (ro, rs), (fo, fs) = results["reuse"], results["forecast"]
    assert rs["steps_by_kind"].keys() - {"reuse"} <= fs["steps_by_kind"].keys()
    assert fs["flops_ratio"] == pytest.approx(rs["flops_ratio"])  # same plan, same cost
    assert fs["peak_stored_bytes"] > rs["peak_stored_bytes"]      # differences are stored
    assert any(not torch.equal(a, b) for a, b in zip(fo, ro))
    assert all(torch.isfinite(o).all() for o in fo)


def test_forecast_and_taylorseer_validation():
    with pytest.raises(ValueError, match="forecast.order=3"):
        build_policy(dict(type="DuCa", forecast=dict(order=3)))
    with pytest.raises(ValueError, match="forecast.horizon"):
        build_policy(dict(type="FORA", forecast=dict(horizon=2)))
    with pytest.raises(ValueError, match="distance"):
        build_policy(dict(type="TaylorSeer", distance="seconds"))
    ts = build_policy(dict(type="TaylorSeer"))
    assert (ts.interval, ts.order, ts.warmup_steps) == (5, 2, 3)
    labels = [str(ts.plan(s, 20, [0.0] * (s + 1)).label) for s in range(10)]
    assert labels == ["full"] * 4 + ["forecast"] * 4 + ["full", "forecast"]
    assert math.isclose(build_policy(dict(type="DuCa", stored_dtype="fp8")).fresh_ratio, 0.1)


def test_int8_codec_accuracy_against_a_direct_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 30, 64, generator=g, dtype=torch.float64) * 3
    codec = Codec("int8")
    e = codec.encode(x)
    assert e.data.dtype == torch.int8 and e.nbytes == x.numel() + 2 * 30 * 4
    step = x.abs().amax(-1, keepdim=True) / 127  # the quantisation step of each token
    back = codec.decode(e, torch.float64)
    assert float(((back - x).abs() / step).max()) <= 0.5 + 1e-6  # round to nearest
    idx = torch.tensor([[3], [4]])
    codec.scatter_(e, idx, torch.full((2, 1, 64), -2.0, dtype=torch.float64))
    out = codec.decode(e, torch.float64)
    assert torch.allclose(out[0, 3], torch.full((64,), -2.0, dtype=torch.float64))


@pytest.mark.parametrize("stored_dtype", ["int8", "fp8", "fp16", None])
def test_a_partial_step_writes_the_store_and_its_decoded_copy_alike(stored_dtype):
    """At a conservative step (no forecast) the recomputed tokens go into the store and into
    the decoded copy the step returns (no second decode of the whole store): bitwise what
    decoding the whole store after the write gives."""
    from test_cache_schedule import sample

    from opensora_duca.cache import runner as R

    model = small_model(depth=2)
    cfg = dict(type="DuCa", stored_dtype=stored_dtype, warmup_steps=1)
    z_new, labels = sample(model, cfg)
    assert "conservative" in labels
    fast = R.BlockRunner._overwrite

    def decode_all(self, name, stored, idx, new, dtype, call=0):
        feature = self.slot.state.feature(name, call)
        feature.scatter_(idx, new)
        return feature.value(self.m.at, dtype)

    R.BlockRunner._overwrite = decode_all
    try:
        z_ref, _ = sample(model, cfg)
    finally:
        R.BlockRunner._overwrite = fast
    assert torch.equal(z_new, z_ref)
