"""Attention backends: sdpa and math agree; optional flash/xformers; clear errors."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from opensora_duca.models.attention import BACKENDS, attention, available_backends, check_backend
from opensora_duca.models.stdit3 import STDiT3


def qkv(seed=0, b=2, h=3, nq=7, nk=5, d=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for n in (nq, nk, nk)]


def explicit(q, k, v, key_mask=None):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / q.shape[-1] ** 0.5
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_and_math_agree(masked):
    q, k, v = qkv()
    key_mask = torch.tensor([[True, True, False, True, False], [True] * 5]) if masked else None
    ref = explicit(q, k, v, key_mask)
    sdpa = attention(q, k, v, "sdpa", key_mask=key_mask)
    assert (sdpa - ref).abs().max() < 1e-12
    # math runs its softmax in fp32
    math_out = attention(q, k, v, "math", key_mask=key_mask)
    assert (math_out - ref).abs().max() < 1e-5
    out, amap = attention(q, k, v, "math", key_mask=key_mask, return_map=True)
    assert amap.shape == (2, 3, 7, 5) and torch.allclose(amap.sum(-1), torch.ones(2, 3, 7))
    if masked:
        assert amap[0, :, :, 2].abs().max() == 0


def test_model_sdpa_vs_math():
    outs = {}
    for backend in ("sdpa", "math"):
        torch.manual_seed(0)
        m = STDiT3(in_channels=4, hidden_size=32, depth=1, num_heads=2, caption_channels=8,
                   model_max_length=5, attn_backend=backend).eval()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 3, 4, 6, generator=g)
        y = torch.randn(2, 1, 5, 8, generator=g)
        with torch.no_grad():
            outs[backend] = m(x, torch.tensor([10.0, 900.0]), y,
                              mask=torch.tensor([[1, 1, 0, 0, 0], [1] * 5]))
    assert (outs["sdpa"] - outs["math"]).abs().max() < 1e-4


def test_auto_resolves_on_cpu():
    assert check_backend("auto") == "auto"
    q, k, v = qkv(dtype=torch.float32)
    assert torch.allclose(attention(q, k, v, "auto"), attention(q, k, v, "sdpa"))


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"'fast' is unknown; accepted: \['auto', 'flash'"):
        check_backend("fast")
    with pytest.raises(ValueError, match="'fast' is unknown"):
        STDiT3(hidden_size=32, depth=1, num_heads=2, attn_backend="fast")
    with pytest.raises(ValueError, match="need the 'math' backend"):
        attention(*qkv(), "sdpa", return_map=True)


@pytest.mark.parametrize("name,pkg", [("flash", "flash_attn"), ("xformers", "xformers")])
def test_unavailable_backend_errors(name, pkg):
    if name in available_backends():
        pytest.skip(f"{name} is available here")
    with pytest.raises(RuntimeError, match=rf"'{name}' needs the '{pkg}' package.*available "
                                           rf"here: \[.*'sdpa'"):
        check_backend(name)


@pytest.mark.parametrize("name", ["flash", "xformers"])
def test_optional_backend_matches_sdpa(name):
    if name not in available_backends():
        pkg = "flash_attn" if name == "flash" else "xformers"
        reason = ("no CUDA device" if importlib.util.find_spec(pkg) else f"{pkg} not installed")
        pytest.skip(f"{name} backend unavailable: {reason}")
    q, k, v = [t.cuda().half() for t in qkv(dtype=torch.float32)]
    ref = attention(q, k, v, "sdpa")
    assert (attention(q, k, v, name) - ref).abs().max() < 1e-2


def test_backend_names():
    assert BACKENDS == ("auto", "flash", "xformers", "sdpa", "math")
    assert {"sdpa", "math"} <= set(available_backends())
