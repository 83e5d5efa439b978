"""STDiT3 under sequence parallelism (gloo, 2 and 4 CPU ranks) gives the single-process output."""
from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

# float64 inside; STDiT3 returns float32, so equal results may still differ by one float32 ulp
TOL = 1e-6


def make_model(seed=0, hidden=64, heads=4, depth=2, caption_channels=16, max_len=6,
               temporal_pos_embed=False):
    from opensora_duca.models.stdit3 import STDiT3
    torch.manual_seed(seed)
    model = STDiT3(in_channels=4, hidden_size=hidden, depth=depth, num_heads=heads,
                   caption_channels=caption_channels, model_max_length=max_len,
                   input_sq_size=32, enable_sequence_parallelism=True, attn_backend="math",
                   temporal_pos_embed=temporal_pos_embed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero everywhere (upstream init zeroes temporal projections)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.double().eval()


def make_inputs(h_pix: int, w_pix: int, seed=0, t=3):
    g = torch.Generator().manual_seed(100 + seed)
    b = 2  # a classifier-free-guidance batch: different captions per sample
    x = torch.randn(b, 4, t, h_pix, w_pix, generator=g, dtype=torch.float64)
    y = torch.randn(b, 1, 6, 16, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    timestep = torch.tensor([700.0, 250.0], dtype=torch.float64)
    x_mask = torch.tensor([[False, True, True], [True, True, False]])
    kw = dict(fps=torch.tensor([24.0, 24.0]), height=torch.tensor([64.0, 64.0]),
              width=torch.tensor([96.0, 96.0]))
    return x, timestep, y, mask, x_mask, kw


CASES = {
    "cfg_batch": dict(h=8, w=6, x_mask=False),     # 4 latent rows: 2 or 1 per rank
    "x_mask": dict(h=8, w=6, x_mask=True),
    "pad_rows": dict(h=6, w=5, x_mask=True),       # 3 latent rows (padded for 2 and 4 ranks), odd W
    # the demo model's absolute frame-index embedding (frames are not sharded)
    "frame_pos_embed": dict(h=6, w=5, x_mask=True, temporal_pos_embed=True),
}


def run_cases(model):
    out = {}
    with_tpe = make_model(temporal_pos_embed=True)
    for name, c in CASES.items():
        x, t, y, mask, x_mask, kw = make_inputs(c["h"], c["w"])
        m = with_tpe if c.get("temporal_pos_embed") else model
        with torch.no_grad():
            out[name] = m(x, t, y, mask=mask, x_mask=x_mask if c["x_mask"] else None, **kw)
    return out


def sp_worker(rank, world_size):
    import opensora_duca.parallel as sp
    calls = {"n": 0}
    orig = sp.all_to_all

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    sp.all_to_all = counting
    out = run_cases(make_model())
    out["all_to_all_calls"] = calls["n"]
    return out


def bad_heads_worker(rank, world_size):
    model = make_model(hidden=48, heads=6 if world_size == 4 else 3)
    x, t, y, mask, _, kw = make_inputs(8, 6)
    try:
        model(x, t, y, mask=mask, **kw)
    except ValueError as err:
        return str(err)
    return None


def group_release_worker(rank, world_size):
    model = make_model()
    seen = []
    model.spatial_blocks[0].attn.register_forward_pre_hook(
        lambda mod, args: seen.append(mod.sp_state.group is not None))
    x, t, y, mask, _, kw = make_inputs(8, 6)
    with torch.no_grad():
        model(x, t, y, mask=mask, **kw)
    return dict(group_during_forward=seen, group_after_is_none=model.sp_state.group is None,
                valid_len_after=model.sp_state.valid_len)


def cache_group_release_worker(rank, world_size):
    """The cache manager uses the group inside a step and holds none after it."""
    from opensora_duca.cache import apply_cache, remove_cache
    model = make_model()
    mgr = apply_cache(model, dict(type="DuCa"))
    seen = []
    model.spatial_blocks[0].register_forward_pre_hook(
        lambda mod, args: seen.append(mgr.group is not None))
    x, t, y, mask, _, kw = make_inputs(8, 6)
    with torch.no_grad():
        model(x, t, y, mask=mask, **kw)
    after = mgr.group is None and model.sp_state.group is None
    remove_cache(model)
    return dict(group_during_forward=seen, group_after_is_none=after)


@pytest.fixture(scope="module")
def single():
    return run_cases(make_model())


@pytest.mark.parametrize("world_size", [2, 4])
def test_sequence_parallel_matches_single_process(single, world_size):
    results = run_distributed(sp_worker, world_size)
    for rank, res in enumerate(results):
        assert res["all_to_all_calls"] > 0, "sequence parallelism was not active"
        for name in CASES:
            diff = (res[name] - single[name]).abs().max().item()
            assert diff <= TOL * max(1.0, single[name].abs().max().item()), \
                f"{name}: rank {rank}/{world_size} differs by {diff}"
            assert res[name].shape == single[name].shape


def test_heads_not_divisible_by_ranks():
    msgs = run_distributed(bad_heads_worker, 2)
    for msg in msgs:
        assert msg is not None and "num_heads=3" in msg and "group size 2" in msg


def test_model_holds_no_process_group_after_forward():
    """A group left in the model outlives destroy_process_group(); freed later, its gloo
    threads abort the process at exit."""
    for res in run_distributed(group_release_worker, 2):
        assert res["group_during_forward"] == [True]
        assert res["group_after_is_none"] and res["valid_len_after"] is None


def test_cache_manager_holds_no_process_group_after_forward():
    for res in run_distributed(cache_group_release_worker, 2):
        assert res["group_during_forward"] == [True]
        assert res["group_after_is_none"]
