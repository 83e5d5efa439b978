"""The cache core's promises: a new model family is one layout adapter (a toy family whose
blocks have other attribute names runs every kind of policy with no change elsewhere), and a
dropped model frees its blocks and stored features without the cyclic garbage collector."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn as nn
from cache_utils import inputs, small_model

from opensora_duca.cache import apply_cache, remove_cache
from opensora_duca.cache.flops import TrunkShape
from opensora_duca.cache.layouts import LAYOUTS, register_layout
from opensora_duca.cache.layouts.stdit3 import STDiT3Layout
from opensora_duca.cache.plan import Kind


class ToyBlock(nn.Module):
    """x + mix(x) + look(x, ctx) + ff(x), with its own names for everything."""

    def __init__(self, c: int):
        super().__init__()
        self.mix = nn.Linear(c, c)
        self.look = nn.Linear(c, c)
        self.ff = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, h, ctx, frames, per_frame):
        h = h + self.mix(h)
        h = h + self.look(h) * ctx[:, None]
        return h + self.ff(h)


class ToyNet(nn.Module):
    def __init__(self, c: int = 8, depth: int = 3):
        super().__init__()
        self.stack = nn.ModuleList([ToyBlock(c) for _ in range(depth)])
        self.inp, self.out = nn.Linear(4, c), nn.Linear(c, 4)

    def forward(self, x, timestep, y):
        b, cin, t, hh, ww = x.shape
        h = self.inp(x.permute(0, 2, 3, 4, 1).reshape(b, t * hh * ww, cin))
        ctx = y.reshape(b, -1)[:, :h.shape[-1]] + timestep[:, None] / 1000
        for blk in self.stack:
            h = blk(h, ctx, t, hh * ww)
        return self.out(h).reshape(b, t, hh, ww, cin).permute(0, 4, 1, 2, 3)


class ToyLayout:
    """The whole of what the cache needs to know about ToyNet."""

    name = "toy"
    requirement = "'stack' of ToyBlocks"
    TAPPED = {"mix": ("attn", None), "look": ("cross", Kind.CROSS_ATTN),
              "ff": ("mlp", Kind.MLP)}
    FULL_CALL_KINDS = (Kind.MLP, Kind.CROSS_ATTN)
    REGIONS: dict = {}
    paired = False

    @staticmethod
    def matches(model):
        return isinstance(getattr(model, "stack", None), nn.ModuleList)

    def __init__(self, model):
        self.depth = len(model.stack)

    def blocks(self, model):
        return [(f"stack.{i}", blk, i) for i, blk in enumerate(model.stack)]

    attn_kind = staticmethod(lambda block: Kind.SPATIAL_ATTN)
    qkv_module = staticmethod(lambda block: block.mix)
    map_module = staticmethod(lambda block: None)
    check_maps = staticmethod(lambda block: None)
    token_sparse = staticmethod(lambda block: False)
    sparse_applies = staticmethod(lambda bound: False)
    sequence_parallel_group = staticmethod(lambda model: None)
    args_rows = staticmethod(STDiT3Layout.args_rows)
    full_step_flops = staticmethod(lambda shape: 3.0 * shape.batch)
    step_flops = staticmethod(lambda shape, plan, part: 0.0 if plan.skip_trunk else
                              3.0 * shape.batch)

    @staticmethod
    def modulated_input(block, h, ctx, frames, per_frame):
        return h * (1 + ctx[:, None])

    def trunk_shape(self, model, x, y, blk, arg=None):
        b, _, t, hh, ww = x.shape
        return TrunkShape(batch=b, frames=t, spatial=hh * ww, hidden=8, depth=self.depth,
                          caption_len=0, mlp_hidden=16, temporal=False), (t, hh, ww)


@pytest.fixture
def toy_family():
    register_layout(ToyLayout)
    yield
    LAYOUTS.pop("toy")


@pytest.mark.parametrize("cfg", [dict(type="none"), dict(type="FORA", interval=2),
                                 dict(type="TrunkReuse"), dict(type="FirstBlockCache",
                                                               threshold=0.5),
                                 dict(type="DuCa", scorer="random", warmup_steps=1)])
def test_a_toy_family_is_one_adapter(toy_family, cfg):
    torch.manual_seed(0)
    model = ToyNet().eval()
    x = torch.randn(2, 4, 2, 3, 4)
    y = torch.randn(2, 1, 1, 8)

    def run():
        outs = []
        for i in range(6):
            outs.append(model(x * (1 - i / 12), torch.full((2,), 1000.0 - 150 * i), y))
        return outs

    with torch.no_grad():
        ref = run()
        mgr = apply_cache(model, cfg)
        with mgr.session(num_steps=6):
            got = run()
        stats = mgr.stats()
        remove_cache(model)
        after = run()
    assert all(torch.equal(a, b) for a, b in zip(after, ref))  # removed exactly
    if cfg["type"] == "none":
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    else:
        assert set(stats["steps_by_kind"]) - {"full"}, stats["steps_by_kind"]  # it cached
        assert not all(torch.equal(a, b) for a, b in zip(got, ref))


def test_an_unknown_family_is_a_clear_error():
    with pytest.raises(TypeError, match="no model family the cache knows.*spatial_blocks"):
        apply_cache(nn.Linear(2, 2), dict(type="DuCa"))


def test_dropping_the_model_frees_blocks_and_features_without_the_gc():
    gc.collect()
    gc.disable()
    try:
        model = small_model()
        x, y, mask = inputs()
        mgr = apply_cache(model, dict(type="DuCa", scorer="random"))
        with torch.no_grad():  # sessionless: the features stay stored after the calls
            for i in range(4):
                model(x, torch.full((2,), 900.0 - 100 * i), y, mask=mask)
        stored = mgr.slots[0].state.mlp.terms[0].data
        block, feature = weakref.ref(model.spatial_blocks[0]), weakref.ref(stored)
        manager = weakref.ref(mgr)
        del model, mgr, stored
        assert manager() is None and block() is None and feature() is None
    finally:
        gc.enable()


def test_an_adaptive_policy_with_an_unknown_measure_is_refused_when_built():
    from dataclasses import dataclass

    from opensora_duca.cache.policies import FirstBlockCache

    @dataclass(frozen=True)
    class Odd(FirstBlockCache):
        measure = "pixels"

    with pytest.raises(ValueError, match="measure='pixels'.*first_pair_residual"):
        Odd()
