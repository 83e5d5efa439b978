"""Open-Sora 2.0's sampler (opensora_duca.schedulers.opensora2) against upstream's formulas,
computed here by hand or in float64: the shifted schedule, latent sizes, pack / unpack and
token positions, the condition types' masks, the three-branch i2v guidance with oscillation
and temporal image scaling, the distilled loop, and the cache session around the loop."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from opensora_duca.cache.manager import _ATTR
from opensora_duca.registry import SCHEDULERS, build_module
from opensora_duca.schedulers import opensora2 as s2


# ------------------------------------------------------------------------------ schedule
def _shifted(n, alpha):
    """float64: t_k = 1 - k / n, then alpha t / (1 + (alpha - 1) t)."""
    return [alpha * (1 - k / n) / (1 + (alpha - 1) * (1 - k / n)) for k in range(n + 1)]


def test_schedule_by_hand():
    # 256 tokens per frame, one frame: alpha = 1, the plain line
    assert s2.get_schedule(4, 256, 1) == pytest.approx([1, 0.75, 0.5, 0.25, 0], abs=1e-7)
    # 4096 tokens, one frame: alpha = 3: 3t / (1 + 2t) at t = .75, .5, .25 -> .9, .75, .5
    assert s2.get_schedule(4, 4096, 1) == pytest.approx([1, 0.9, 0.75, 0.5, 0], abs=1e-7)
    # 256 tokens, 4 frames: alpha = 1 * sqrt(4) = 2: 2t / (1 + t) -> 6/7, 2/3, 2/5
    assert s2.get_schedule(4, 256, 4) == pytest.approx([1, 6 / 7, 2 / 3, 2 / 5, 0], abs=1e-7)
    # shift=False: no shift at any size; a given flow_shift replaces the estimate
    assert s2.get_schedule(4, 4096, 33, shift=False) == pytest.approx(
        [1, 0.75, 0.5, 0.25, 0], abs=1e-7)
    assert s2.get_schedule(2, 4096, 33, shift_alpha=7.0) == pytest.approx(
        [1, 3.5 / 4, 0], abs=1e-7)


@pytest.mark.parametrize("tokens, frames", [(12 * 21, 33), (36 * 64, 33), (16 * 16, 1),
                                            (8 * 8, 9)])
def test_schedule_float64(tokens, frames):
    # upstream's 256px 16:9 (192 x 336 px: 12 x 21 tokens, 129 frames: 33 latent) and 768px
    # (576 x 1024: 36 x 64 tokens): alpha = (1 + 2 (S - 256) / 3840) sqrt(T')
    alpha = (1 + 2 * (tokens - 256) / 3840) * math.sqrt(frames)
    got = s2.get_schedule(50, tokens, frames)
    assert len(got) == 51 and got[0] == 1.0 and got[-1] == 0.0
    assert got == pytest.approx(_shifted(50, alpha), abs=1e-6)
    sampler = s2.OpenSora2Sampler(num_steps=50, guidance_img=3.0)
    assert sampler.timesteps(tokens, frames) == got


def test_latent_frames_and_noise_shape():
    assert s2.latent_frames(129, 4, causal=True) == 33
    assert s2.latent_frames(128, 4, causal=True) == 32  # upstream's high-compression run
    assert s2.latent_frames(128, 4, causal=False) == 32
    assert s2.latent_frames(1, 4, causal=True) == 1
    assert s2.latent_frames(33, 1) == 33
    # 256px 16:9 (192 x 336): 2 ceil(192 / 16) x 2 ceil(336 / 16); 16 = 64 / 2^2 channels
    assert s2.noise_shape(1, 192, 336, 33) == (1, 16, 33, 24, 42)
    # DC-AE: patch 1, 32 px per token, 128 channels; sizes round up
    assert s2.noise_shape(2, 200, 330, 32, 1, 128, 32) == (2, 128, 32, 7, 11)


def test_noise_per_sample_seed():
    a = s2.get_noise([5, 6], 32, 48, 3)
    b = s2.get_noise([6], 32, 48, 3)
    assert a.shape == (2, 16, 3, 4, 6)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    ref = torch.randn(16, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], ref)


# ------------------------------------------------------------------ pack / unpack / ids
def test_pack_layout_and_round_trip():
    x = torch.randn(2, 3, 4, 6, 8)
    p = 2
    tok = s2.pack(x, p)
    assert tok.shape == (2, 4 * 3 * 4, 3 * 4)
    for b, t, r, c, ch, i, j in [(0, 0, 0, 0, 0, 0, 0), (1, 3, 2, 3, 2, 1, 1),
                                 (0, 2, 1, 2, 1, 0, 1), (1, 1, 0, 3, 2, 1, 0)]:
        assert tok[b, (t * 3 + r) * 4 + c, (ch * p + i) * p + j] == x[b, ch, t, r * p + i,
                                                                       c * p + j]
    # 48 x 64 pixels at 16 px per token -> 3 x 4 tokens per frame
    assert torch.equal(s2.unpack(tok, 48, 64, 4, p), x)
    x1 = torch.randn(1, 5, 2, 3, 4)
    assert torch.equal(s2.unpack(s2.pack(x1, 1), 96, 128, 2, 1, 32), x1)
    with pytest.raises(ValueError, match="do not fit"):
        s2.unpack(tok, 64, 64, 4, p)


def test_prepare_ids():
    img_ids, txt_ids = s2.prepare_ids(3, 2, 3, 4, 7)
    assert img_ids.shape == (3, 24, 3) and txt_ids.shape == (3, 7, 3)
    assert not txt_ids.any()
    k = 0
    for t in range(2):
        for r in range(3):
            for c in range(4):
                assert img_ids[2, k].tolist() == [t, r, c]
                k += 1


# ------------------------------------------------------------------------- conditions
def _frames(mask):
    return [f for f in range(mask.shape[2]) if bool(mask[0, 0, f].all())]


@pytest.mark.parametrize("cond_type, causal, frames", [
    ("t2v", True, []),
    ("i2v_head", True, [0]),
    ("i2v_tail", True, [19]),
    ("i2v_loop", True, [0, 19]),
    ("v2v_head", True, list(range(9))),
    ("v2v_head", False, list(range(8))),
    ("v2v_tail", True, list(range(11, 20))),
    ("v2v_head_half", True, list(range(17))),
    ("v2v_tail_half", False, list(range(4, 20))),
    ("v2v_tail_easy", True, list(range(3, 20))),
])
def test_condition_masks(cond_type, causal, frames):
    shape = (2, 4, 20, 3, 5)
    first = torch.randn(4, 20, 3, 5)
    last = torch.randn(4, 20, 3, 5)
    refs = [[first, last], None]  # the second sample has no reference: t2v
    masks, ref = s2.prepare_condition(shape, cond_type, refs, causal=causal)
    assert masks.shape == (2, 1, 20, 3, 5) and ref.shape == shape
    assert _frames(masks) == frames
    assert not masks[1].any() and not ref[1].any()
    assert set(masks[0].unique().tolist()) <= {0.0, 1.0}
    expect = torch.zeros(4, 20, 3, 5)
    name = s2.check_cond_type(cond_type)
    if name in ("i2v_head", "i2v_loop"):
        expect[:, 0] = first[:, 0]
    if name in ("i2v_tail", "i2v_loop"):
        expect[:, -1] = last[:, -1]
    if name.startswith("v2v_head"):
        expect[:, frames] = first[:, frames]
    if name.startswith("v2v_tail"):
        expect[:, frames] = first[:, frames]  # the first reference's last k frames
    assert torch.equal(ref[0], expect)
    for f in range(20):  # masked_ref is zero exactly where the mask is
        if f not in frames:
            assert not ref[0, :, f].any()


def test_condition_edge_cases():
    one = torch.randn(4, 1, 3, 5)
    masks, ref = s2.prepare_condition((1, 4, 1, 3, 5), "i2v_head", [[one]])
    assert not masks.any() and not ref.any()  # an image (T = 1) gets no condition
    with pytest.raises(ValueError, match="at least 9"):
        s2.prepare_condition((1, 4, 12, 3, 5), "v2v_head", [[torch.randn(4, 5, 3, 5)]])
    with pytest.raises(ValueError, match="one reference entry per sample"):
        s2.prepare_condition((2, 4, 12, 3, 5), "i2v_head", [[one]])
    with pytest.raises(ValueError, match="accepted"):
        s2.prepare_condition((1, 4, 12, 3, 5), "i2v_head", [[torch.randn(4, 1, 3, 6)]])
    with pytest.raises(ValueError, match="cond_type='v2v'"):
        s2.check_cond_type("v2v")
    assert s2.check_cond_type(None) == "t2v"
    assert s2.check_cond_type("v2v_head_easy") == "v2v_head_half"
    assert s2.condition_frames("v2v_tail_half", causal=True) == 17
    assert s2.reference_pixel_frames("v2v_head", causal=True) == 33
    assert s2.reference_pixel_frames("v2v_head_half", causal=False) == 64


# ------------------------------------------------------------------------- guidance
def test_oscillation_and_temporal_scale():
    # the scale on steps < 10 and even steps, 1 on odd steps from 10 on
    assert [s2.oscillation_scale(7.5, i) for i in (0, 1, 9, 10, 11, 12, 13)] == \
        [7.5, 7.5, 7.5, 7.5, 1.0, 7.5, 1.0]
    # step 2 of 4 (5 times): the top is 3 + (1 - 3) * 2 / 4 = 2; frames 1 .. 2 over 3 frames
    w = s2.temporal_image_scale(3.0, 2, 4, 3, 2)
    assert w.shape == (1, 6, 1) and w.dtype == torch.float32
    assert w.flatten().tolist() == pytest.approx([1, 1, 1.5, 1.5, 2, 2])


class StandIn(nn.Module):
    """Upstream's MMDiT call signature; every input shapes the output (in the inputs'
    dtype), so each guidance branch differs."""

    def __init__(self, channels, cond_channels, ctx, vec):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("a", torch.randn(cond_channels, channels, generator=g,
                                              dtype=torch.float64) * 0.3)
        self.register_buffer("b", torch.randn(ctx, channels, generator=g, dtype=torch.float64))
        self.register_buffer("c", torch.randn(vec, channels, generator=g, dtype=torch.float64))
        self.calls = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y_vec, cond=None, guidance=None):
        self.calls.append(dict(img=img.clone(), cond=None if cond is None else cond.clone(),
                               timesteps=timesteps.clone(), guidance=guidance.clone()))
        d = img.dtype
        out = img * (0.5 - timesteps)[:, None, None] + (txt.mean(1) @ self.b.to(d))[:, None]
        out = out + (y_vec @ self.c.to(d))[:, None] * 0.5 + 0.01 * img_ids[..., :1]
        if cond is not None:
            out = out + torch.tanh(cond @ self.a.to(d))
        return out


def _inputs(b, frames, h, w, ctx=6, vec=5, dtype=torch.float32, rows=3):
    """Packed noise and the text inputs of ``rows`` x b rows."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 16, frames, 2 * h, 2 * w, generator=g, dtype=torch.float64)
    img = s2.pack(x, 2)
    txt = torch.randn(rows * b, 4, ctx, generator=g, dtype=torch.float64)
    y_vec = torch.randn(rows * b, vec, generator=g, dtype=torch.float64)
    img_ids, txt_ids = s2.prepare_ids(rows * b, frames, h, w, 4, dtype=torch.float64)
    return [v.to(dtype) for v in (img, img_ids, txt, txt_ids, y_vec)]


def test_i2v_loop_against_explicit_float64():
    """The whole 12-step i2v_head run (steps 0-9 guided, then oscillating: steps 10 even,
    11 odd) against the loop written out here in float64."""
    b, frames, h, w, n = 2, 3, 2, 3, 12
    g_txt, g_img = 6.0, 3.0
    sampler = s2.OpenSora2Sampler(num_steps=n, guidance=g_txt, guidance_img=g_img,
                                  text_osci=True, image_osci=True, scale_temporal_osci=True,
                                  is_causal_vae=True, temporal_reduction=4)
    refs = [[torch.randn(16, 1, 2 * h, 2 * w)] for _ in range(b)]
    masks, masked_ref = s2.prepare_condition((b, 16, frames, 2 * h, 2 * w), "i2v_head", refs)
    model = StandIn(64, 68, 6, 5).eval()
    ts = sampler.timesteps(h * w, frames)
    img, img_ids, txt, txt_ids, y_vec = _inputs(b, frames, h, w)
    out = sampler.sample(model, img, img_ids, txt, txt_ids, y_vec, ts, frames, masks=masks,
                         masked_ref=masked_ref, cond_type="i2v_head")

    # float64 reference, every formula written out
    x = _inputs(b, frames, h, w, dtype=torch.float64)
    xr, ids, tx, tids, yv = x
    c = s2.pack(torch.cat([masks, masked_ref], 1).double(), 2)
    zero = torch.zeros_like(c)
    tok = h * w
    for i in range(n):
        t0, t1 = float(ts[i]), float(ts[i + 1])
        rows = torch.cat([xr, xr, xr])
        tv = torch.full((3 * b,), t0, dtype=torch.float64)
        pred = model(rows, ids, tx, tids, tv, yv, torch.cat([c, c, zero]),
                     torch.full((3 * b,), g_txt, dtype=torch.float64))
        v_c, v_u, v_0 = pred[:b], pred[b:2 * b], pred[2 * b:]
        text = g_txt if (i < 10 or i % 2 == 0) else 1.0
        image = g_img if (i < 10 or i % 2 == 0) else 1.0
        if image > 1:  # frame f of T: 1 + (top - 1) f / (T - 1), top = g + (1 - g) i / n
            top = image + (1 - image) * i / n
            per_frame = [1 + (top - 1) * f / (frames - 1) for f in range(frames)]
            image = torch.tensor(per_frame, dtype=torch.float64).repeat_interleave(tok)
            image = image[None, :, None]
        v = v_0 + image * (v_u - v_0) + text * (v_c - v_u)
        xr = xr + (t1 - t0) * v
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), xr, rtol=1e-5, atol=1e-5)

    # what the model saw: [x, x, x], cond [c, c, 0], t and the text scale on every row
    assert len(model.calls) == 2 * n
    call = model.calls[n + 3]  # the sampler's step 3
    xs = call["img"]
    assert torch.equal(xs[:b], xs[b:2 * b]) and torch.equal(xs[:b], xs[2 * b:])
    assert torch.equal(call["cond"][:b], c.float()) and torch.equal(call["cond"][b:2 * b],
                                                                   c.float())
    assert not call["cond"][2 * b:].any()
    assert call["timesteps"].tolist() == [pytest.approx(ts[3])] * (3 * b)
    assert call["guidance"].tolist() == [g_txt] * (3 * b)
    # the condition itself: the first frame's tokens carry mask 1 and the reference
    assert bool(c[:, :tok, :4].eq(1).all()) and not c[:, tok:, :4].any()


def test_temporal_scaling_only_for_i2v_and_above_one():
    sampler = s2.OpenSora2Sampler(num_steps=12, guidance=5.0, guidance_img=2.0,
                                  image_osci=True, scale_temporal_osci=True)
    text, image = sampler.scales(0, "i2v_tail", 3, 4)
    assert text == 5.0 and isinstance(image, torch.Tensor) and image.shape == (1, 12, 1)
    assert sampler.scales(0, "v2v_head", 3, 4) == (5.0, 2.0)  # v2v: no temporal scaling
    assert sampler.scales(11, "i2v_head", 3, 4) == (5.0, 1.0)  # oscillated to 1: none
    plain = s2.OpenSora2Sampler(num_steps=12, guidance=5.0, guidance_img=0.5,
                                scale_temporal_osci=True)
    assert plain.scales(0, "i2v_head", 3, 4) == (5.0, 0.5)  # not above 1: none


def test_distilled_loop_by_hand():
    b, frames, h, w = 2, 2, 2, 2
    sampler = s2.OpenSora2Sampler(num_steps=3, guidance=3.5, method="distill", shift=False)
    model = StandIn(64, 68, 6, 5).eval()
    ts = sampler.timesteps(h * w, frames)
    assert ts == pytest.approx([1, 2 / 3, 1 / 3, 0])
    img, img_ids, txt, txt_ids, y_vec = _inputs(b, frames, h, w, rows=1)
    out = sampler.sample(model, img, img_ids, txt, txt_ids, y_vec, ts, frames)
    x = img.double()
    d = [v.double() for v in (img_ids, txt, txt_ids, y_vec)]
    for i in range(3):
        tv = torch.full((b,), float(ts[i]), dtype=torch.float64)
        x = x + (ts[i + 1] - ts[i]) * model(x, d[0], d[1], d[2], tv, d[3], None,
                                            torch.full((b,), 3.5, dtype=torch.float64))
    torch.testing.assert_close(out.double(), x, rtol=1e-5, atol=1e-5)
    assert all(c["cond"] is None for c in model.calls[:3])
    assert model.calls[0]["guidance"].tolist() == [3.5, 3.5]


def test_cache_session_wraps_the_loop():
    seen = []

    class Manager:
        @contextlib.contextmanager
        def session(self, num_steps, timesteps=None):
            seen.append(("open", num_steps, list(timesteps)))
            yield self
            seen.append(("close",))

    class Model(StandIn):
        def forward(self, *args, **kwargs):
            seen.append("call")
            return super().forward(*args, **kwargs)

    model = Model(64, 68, 6, 5)
    setattr(model, _ATTR, Manager())
    sampler = s2.OpenSora2Sampler(num_steps=3, guidance_img=2.0)
    frames, h, w = 2, 2, 2
    ts = sampler.timesteps(h * w, frames)
    masks, ref = s2.prepare_condition((1, 16, frames, 4, 4), "t2v")
    sampler.sample(model, *_inputs(1, frames, h, w), ts, frames, masks=masks, masked_ref=ref)
    assert seen == [("open", 3, ts[:3]), "call", "call", "call", ("close",)]


def test_sampler_options_are_checked():
    assert isinstance(build_module(dict(type="opensora2", guidance_img=3.0), SCHEDULERS),
                      s2.OpenSora2Sampler)
    for kwargs, key in ((dict(num_steps=0), "num_steps"), (dict(method="flow"), "method"),
                        (dict(guidance_img=None), "guidance_img"),
                        (dict(guidance=float("nan")), "guidance"),
                        (dict(text_osci=1), "text_osci"), (dict(flow_shift=0), "flow_shift"),
                        (dict(temporal_reduction=0), "temporal_reduction")):
        kwargs = dict(dict(guidance_img=3.0), **kwargs)
        with pytest.raises(ValueError, match=f"sampling_option.{key}=") as err:
            s2.OpenSora2Sampler(**kwargs)
        assert "\n" not in str(err.value)
    s2.OpenSora2Sampler(method="distill")  # no image guidance needed
    sampler = s2.OpenSora2Sampler(num_steps=2, guidance_img=2.0)
    with pytest.raises(ValueError, match="3 x 1 rows"):
        sampler.sample(StandIn(64, 68, 6, 5), *_inputs(1, 1, 2, 2, rows=1), [1, 0.5, 0], 1)
