"""The fused forecast read-out and update of ``Feature`` against float64 references of the Taylor
and bdf2 formulas written here from their definitions (the difference table and the derivative
of the interpolating polynomial), for every order and store; and the aliasing rules: the cache
never writes into a tensor the model gave it or was handed, and a read-out is a fresh tensor."""
import pytest
import torch

from opensora_duca.cache.state import Codec, Feature, StoredBytes

SHAPE = (2, 24, 16)
TOP = {"int8": 127.0, "fp8": 448.0}


def quantise(x: torch.Tensor, store):
    """What the store keeps of x, dequantised (the per-token float32 scale of the spec)."""
    if store is None:
        return x.double()
    if store == "fp16":
        return x.half().double()
    scale = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / TOP[store]
    q = x.float() / scale
    if store == "int8":
        q = torch.round(q).clamp(-127, 127)
    else:
        q = q.to(torch.float8_e4m3fn).float()
    return q.double() * scale.double()


def taylor_reference(history, order, at, store):
    """Difference table: D0 = f(a), D(i+1) = (Di(a) - Di(prev)) / h (each Di kept as the store
    keeps it); the read-out sum_i Di d^i / i!."""
    kept, anchor = None, None
    for value, a in history:
        raw = [value.double()]
        if order and kept is not None and a != anchor:
            for i in range(min(order, len(kept))):
                raw.append((raw[i] - kept[i]) / (a - anchor))
        kept, anchor = [quantise(r, store) for r in raw], a
    if len(kept) == 1:
        return kept[0]
    d, out, fact = at - anchor, torch.zeros_like(kept[0]), 1.0
    for i, term in enumerate(kept):
        fact = fact * i if i else 1.0
        out = out + term * d ** i / fact
    return out


def interp_slope(ts, fs, at):
    """Derivative at ``at`` of the polynomial through (ts[k], fs[k]) (Lagrange form)."""
    total = torch.zeros_like(fs[0])
    for j, (tj, fj) in enumerate(zip(ts, fs)):
        # d/dt prod_{m != j} (t - tm) / (tj - tm)
        denom = 1.0
        for m, tm in enumerate(ts):
            if m != j:
                denom *= tj - tm
        deriv = 0.0
        for k, tk in enumerate(ts):
            if k == j:
                continue
            prod = 1.0
            for m, tm in enumerate(ts):
                if m not in (j, k):
                    prod *= at - tm
            deriv += prod
        total = total + fj * (deriv / denom)
    return total


def bdf2_reference(history, at, store, heun):
    """The last three values (newest first); predictor F0 + d * (slope of the quadratic through
    them at a0); Heun: the mean of that slope and the slope at a0 + d of the quadratic through
    (F1, F0, predicted)."""
    kept = []
    for value, a in history:
        kept = [(quantise(value, store), a)] + [(f, b) for f, b in kept if b != a][:2]
    fs, ts = [f for f, _ in kept], [a for _, a in kept]
    d = at - ts[0]
    if len(fs) == 1 or d == 0:
        return fs[0]
    slope = interp_slope(ts, fs, ts[0])
    pred = fs[0] + d * slope
    if len(fs) == 2 or not heun:
        return pred
    slope_p = interp_slope([ts[1], ts[0], at], [fs[1], fs[0], pred], at)
    return fs[0] + d * (slope + slope_p) / 2


def smooth_history(anchors, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(4)]
    scale = max(abs(a) for a in anchors) or 1.0
    return [((c[0] + c[1] * (a / scale) + c[2] * (a / scale) ** 2 + c[3] * (a / scale) ** 3)
             .to(dtype), a) for a in anchors]


def tolerance(store, ref):
    big = float(ref.abs().max())
    if store is None:
        return dict(rtol=1e-6, atol=1e-6 * big)
    return dict(rtol=1e-5, atol=1e-5 * big)


ANCHOR_SETS = [[0.0, 1.0, 3.0, 4.0, 7.0], [1000.0, 950.0, 870.0, 800.0]]


@pytest.mark.parametrize("store", [None, "fp16", "int8", "fp8"])
@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("anchors", ANCHOR_SETS)
def test_taylor_readout_matches_the_difference_table(store, order, anchors):
    history = smooth_history(anchors)
    span = anchors[-1] - anchors[-2]
    f = Feature(Codec(store), StoredBytes(), order)
    for n in range(1, len(history) + 1):
        f.update(*history[n - 1])
        for frac in (0.0, 0.5, 1.0, 2.5, -0.75):
            at = history[n - 1][1] + frac * span
            want = taylor_reference(history[:n], order, at, store)
            got = f.value(at, torch.float32)
            assert got.dtype == torch.float32 and got.shape == SHAPE
            torch.testing.assert_close(got.double(), want, **tolerance(store, want))
            got64 = f.value(at, torch.float64)
            torch.testing.assert_close(got64, want, **tolerance(store, want))


@pytest.mark.parametrize("store", [None, "int8", "fp8"])
@pytest.mark.parametrize("heun", [False, True])
@pytest.mark.parametrize("anchors", ANCHOR_SETS)
def test_bdf2_readout_matches_the_interpolating_polynomial(store, heun, anchors):
    history = smooth_history(anchors, seed=1)
    span = anchors[-1] - anchors[-2]
    f = Feature(Codec(store), StoredBytes(), 2, "bdf2", "heun" if heun else None)
    for n in range(1, len(history) + 1):
        f.update(*history[n - 1])
        for frac in (0.0, 0.5, 1.0, 2.5):
            at = history[n - 1][1] + frac * span
            want = bdf2_reference(history[:n], at, store, heun)
            got = f.value(at, torch.float32)
            torch.testing.assert_close(got.double(), want, **tolerance(store, want))


@pytest.mark.parametrize("method", ["taylor", "bdf2"])
def test_low_precision_reads_round_once(method):
    """bf16 features (an unencoded store): the read-out is the float32 combination rounded once
    to bf16 (within a bf16 step of the float64 reference)."""
    history = smooth_history([0.0, 2.0, 4.0], seed=2, dtype=torch.bfloat16)
    f = Feature(Codec(None), StoredBytes(), 2, method)
    for v, a in history:
        f.update(v, a)
    for at in (5.0, 6.0, 9.0):
        got = f.value(at, torch.bfloat16)
        assert got.dtype == torch.bfloat16
        want = taylor_reference(history, 2, at, None) if method == "taylor" else \
            bdf2_reference(history, at, None, False)
        step = float(want.abs().max()) * 2 ** -7
        assert float((got.double() - want).abs().max()) <= step


@pytest.mark.parametrize("store", [None, "fp16", "int8", "fp8"])
@pytest.mark.parametrize("order", [1, 2])
def test_updates_and_reads_never_write_into_the_models_tensors(store, order):
    history = smooth_history([0.0, 1.0, 2.0, 3.0, 5.0, 6.0], seed=3)
    given, copies, reads = [], [], []
    f = Feature(Codec(store), StoredBytes(), order)
    for k, (v, a) in enumerate(history):
        if k % 2:  # a non-contiguous output: the store keeps a copy of its own
            v = v.transpose(0, 1).contiguous().transpose(0, 1)
        given.append(v)
        copies.append(v.clone())
        f.update(v, a)
        out = f.value(a + 1.0, torch.float32)
        reads.append((out, out.clone()))
        # the runner writes recomputed tokens into a forecast: it must not reach the store
        before = f.value(a + 0.5, torch.float32).clone()
        out.view(2, -1, 16)[:, :3] = 1e6
        torch.testing.assert_close(f.value(a + 0.5, torch.float32), before, rtol=0, atol=0)
    for v, c in zip(given, copies):
        assert torch.equal(v, c)
    for out, c in reads[:-1]:  # a read-out handed to the model is never reused as a buffer
        assert torch.equal(out[:, 3:], c[:, 3:])


def test_a_value_handed_out_is_not_a_buffer_afterwards():
    """Order 0 hands out the stored tensor itself (here the store's own copy of a
    non-contiguous output); with forecasting even a one-anchor read is a fresh tensor."""
    v = torch.randn(SHAPE).transpose(0, 1).contiguous().transpose(0, 1)
    f0 = Feature(Codec(None), StoredBytes(), 0)
    f0.update(v, 0.0)
    assert f0.value(1.0, torch.float32).data_ptr() == f0.terms[0].data.data_ptr()
    f1 = Feature(Codec(None), StoredBytes(), 1)
    w = torch.randn(SHAPE)
    f1.update(w, 0.0)
    held = f1.value(1.0, torch.float32)
    assert torch.equal(held, w) and held.data_ptr() != w.data_ptr()
    held.fill_(3.0)
    assert torch.equal(f1.value(1.0, torch.float32), w)


@pytest.mark.parametrize("order", [1, 2])
def test_steady_updates_reuse_the_difference_buffers_and_count_bytes(order):
    counter = StoredBytes()
    f = Feature(Codec(None), counter, order)
    history = smooth_history([float(a) for a in range(6)], seed=4)
    for v, a in history[:order + 1]:
        f.update(v, a)
    for v, a in history[order + 1:]:
        buffers = {e.data.data_ptr() for e in f.terms[1:]}
        f.update(v, a)
        assert f.terms[0].data is v
        assert {e.data.data_ptr() for e in f.terms[1:]} == buffers
        assert counter.current == (order + 1) * v.numel() * v.element_size()
    f.clear()
    assert counter.current == 0
