"""The cache plugin on an upstream-shaped Open-Sora 1.3 model (tests/upstream_double_v13.py):
the double computes what this project's 1.3 STDiT3 computes; ``none`` is bitwise; every policy
and every scorer follows its plan and matches this project's model on upstream's layout (qkv on
padded 5-D windows, attention maps through attn_drop)."""
from __future__ import annotations

import pytest
import torch
from cache_utils import inputs, small_model, trajectory
from upstream_double_v13 import UpstreamShapedSTDiT3V13, load_state_dict_v13

from opensora_duca.cache import apply_cache, remove_cache

V13 = dict(kernel_size=(2, 4, -1), use_spatial_rope=True)
H, W, STEPS = 6, 10, 10


def pair(**kw):
    ours = small_model(hidden=48, heads=4, cond_embedders=True, **V13, **kw)
    double = UpstreamShapedSTDiT3V13(hidden_size=48, depth=2, num_heads=4,
                                     caption_channels=32, model_max_length=8, **V13).eval()
    load_state_dict_v13(double, ours.state_dict())
    return ours, double


def size_args(b=2, h=H, w=W):
    return dict(fps=torch.tensor([24.0]), height=torch.tensor([256.0 * h / H] * b),
                width=torch.tensor([320.0 * w / W] * b))


def i2v(x, y):
    cm = torch.zeros_like(x)
    cm[:, :, 0] = 1.0
    return dict(cond=x * cm, cond_mask=cm, mask_index=[0],
                y_null=torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("cond", [False, True])
def test_double_equals_stdit3_uncached(cond):
    ours, double = pair()
    x, y, mask = inputs(h=H, w=W)
    kw = dict(size_args(), **(i2v(x, y) if cond else {}))
    a = trajectory(ours, x, y, mask, steps=2, **kw)
    b = trajectory(double, x, y, mask, steps=2, **kw)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


def test_none_is_bitwise_identical_on_the_double():
    _, double = pair()
    x, y, mask = inputs(h=H, w=W)
    ref = trajectory(double, x, y, mask, steps=3, **size_args())
    mgr = apply_cache(double, dict(type="none"))
    with mgr.session(num_steps=3):
        out = trajectory(double, x, y, mask, steps=3, **size_args())
    remove_cache(double)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def _cached(model, cfg, x, y, mask, h=H, w=W):
    mgr = apply_cache(model, cfg)
    with mgr.session(num_steps=STEPS):
        out = trajectory(model, x, y, mask, steps=STEPS, **size_args(h=h, w=w))
        labels = mgr.stats()["step_labels"]
    remove_cache(model)
    return out, labels


def _same_as_ours(cfg):
    ours, double = pair()
    x, y, mask = inputs(h=H, w=W)
    a, la = _cached(ours, cfg, x, y, mask)
    b, lb = _cached(double, cfg, x, y, mask)
    assert la == lb
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [dict(type="PAB"), dict(type="TrunkReuse"),
                                 dict(type="TeaCache"), dict(type="FirstBlockCache")])
def test_policies_through_the_blocks_forward_match_stdit3(cfg):
    _same_as_ours(cfg)


@pytest.mark.parametrize("cfg", [dict(type="FORA"), dict(type="DuCa", scorer="random")])
def test_conservative_on_upstream_window_layout(cfg):
    """Upstream's block class is STDiT3Block (the token-sparse path) and its temporal window
    attention returns [B, H, W, T, C], the memory order of [(B S), T, C]: same result."""
    _same_as_ours(cfg)


# latent grids 3 x 5 (windows 2 x 4 padded to 4 x 8) and 4 x 8 (no padding)
GRIDS = {"padded": (6, 10), "unpadded": (8, 16)}


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("scorer", ["vnorm", "attention", "similarity", "norm", "random"])
def test_every_scorer_on_upstream_window_attention(scorer, grid):
    """Upstream 1.3 applies qkv to the padded windows cut into the batch ([windows * B, kH, kW,
    kT, C]) and passes attention maps through attn_drop: every scorer reads them, maps window
    rows back to the token grid and drops padding, so the default DuCa (vnorm) and the others
    follow the plan of this project's model and give its output."""
    h, w = GRIDS[grid]
    ours, double = pair(attn_backend="math" if scorer == "attention" else "sdpa")
    x, y, mask = inputs(h=h, w=w)
    cfg = dict(type="DuCa", scorer=scorer)
    a, la = _cached(ours, cfg, x, y, mask, h, w)
    b, lb = _cached(double, cfg, x, y, mask, h, w)
    assert la == lb and "conservative" in la and "aggressive" in la
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)


def test_attention_scorer_refused_on_fused_upstream_attention():
    """Upstream's fused path (enable_flash_attn) computes no map: refused when attached."""
    _, double = pair()
    for blk in list(double.spatial_blocks) + list(double.temporal_blocks):
        blk.attn.enable_flash_attn = True
    with pytest.raises(ValueError, match="enable_flash_attn=False.*'vnorm'"):
        apply_cache(double, dict(type="DuCa", scorer="attention"))
