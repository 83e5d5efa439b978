"""An Open-Sora 1.3 STDiT3 under sequence parallelism (gloo, 2 and 4 CPU ranks): the
single-process output for window attention (whose windows cross the rank boundaries: the rows
are gathered, the heads scattered), the 3-D rope, padded rows and a CFG batch; and the cache
plugin on it: the same output and plan on every rank count, no collective inside the trunk on
cached steps."""
from __future__ import annotations

import pytest
import torch
from cache_utils import inputs, small_model, trajectory
from dist_utils import observe_collectives, run_distributed

TOL = 1e-6  # float64 inside, float32 output
V13 = dict(kernel_size=(2, 4, -1), use_spatial_rope=True, cond_embedders=True)
CASES = {  # name -> (model options, latent pixels h, w, forward extras)
    "cfg_batch": (V13, 8, 10, {}),                          # 4 rows: 2 or 1 per rank
    "pad_rows_x_mask": (V13, 10, 10, dict(x_mask=True)),    # 5 rows: padded for 2 and 4 ranks
    "i2v": (V13, 10, 10, dict(mask_index=[0])),
    "frame_windows": (dict(kernel_size=(3, 2, 2)), 10, 6, {}),
    "skip_temporal": (dict(V13, skip_temporal=True), 10, 10, {}),
}


def make_model(opts, seed=0):
    from opensora_duca.models.stdit3 import STDiT3
    torch.manual_seed(seed)
    model = STDiT3(in_channels=4, hidden_size=48, depth=2, num_heads=4, caption_channels=16,
                   model_max_length=6, input_sq_size=32, enable_sequence_parallelism=True,
                   attn_backend="math", **opts)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.double().eval()


def run_model_cases():
    out = {}
    for name, (opts, h, w, extra) in CASES.items():
        g = torch.Generator().manual_seed(100)
        x = torch.randn(2, 4, 3, h, w, generator=g, dtype=torch.float64)
        y = torch.randn(2, 1, 6, 16, generator=g, dtype=torch.float64)
        kw = dict(mask=torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]),
                  fps=torch.tensor([24.0, 24.0]), height=torch.tensor([64.0, 64.0]),
                  width=torch.tensor([96.0, 96.0]))
        if extra.get("x_mask"):
            kw["x_mask"] = torch.tensor([[False, True, True], [True, True, False]])
        if "mask_index" in extra:
            cm = torch.zeros_like(x)
            cm[:, :, extra["mask_index"]] = 1.0
            kw.update(cond=x * cm, cond_mask=cm, mask_index=extra["mask_index"],
                      y_null=torch.randn(y.shape, generator=g, dtype=torch.float64))
        with torch.no_grad():
            out[name] = make_model(opts)(x, torch.tensor([700.0, 250.0]), y, **kw)
    return out


CACHE_STEPS = 10


def run_cache_case(sp: bool):
    from opensora_duca.cache import apply_cache, remove_cache
    m = small_model(hidden=48, heads=4, enable_sequence_parallelism=sp, **V13)
    x, y, mask = inputs(h=10, w=10)  # 5 latent rows: padded for 2 and 4 ranks
    mgr = apply_cache(m, dict(type="DuCa"))
    with mgr.session(num_steps=CACHE_STEPS):
        out = torch.stack(trajectory(m, x, y, mask, steps=CACHE_STEPS))
        labels = mgr.stats()["step_labels"]
    remove_cache(m)
    return out, labels


_COLLECTIVES = ("all_to_all_single", "all_gather", "all_reduce", "broadcast", "barrier")


def _count_collectives():
    """DuCa on 2 ranks: the collectives of each step, marked inside / outside the trunk."""
    from opensora_duca.cache import apply_cache
    calls, in_trunk = [], {"on": False}
    with observe_collectives(lambda name, kw: calls.append((name, in_trunk["on"])),
                             _COLLECTIVES):
        m = small_model(hidden=48, heads=4, enable_sequence_parallelism=True, **V13)
        x, y, mask = inputs(h=10, w=10)
        mgr = apply_cache(m, dict(type="DuCa"))
        m.spatial_blocks[0].register_forward_pre_hook(lambda *a: in_trunk.update(on=True))
        m.temporal_blocks[-1].register_forward_hook(lambda *a: in_trunk.update(on=False))
        per_step = []
        with mgr.session(num_steps=CACHE_STEPS), torch.no_grad():
            for i in range(CACHE_STEPS):
                calls.clear()
                m(x, torch.full((2,), 1000.0 * (1 - i / CACHE_STEPS)), y, mask=mask)
                per_step.append(list(calls))
            labels = mgr.stats()["step_labels"]
    return per_step, labels


def worker(rank, world, count):
    res = {"model": run_model_cases(), "cache": run_cache_case(sp=True)}
    if count:
        res["collectives"] = _count_collectives()
    return res


@pytest.fixture(scope="module")
def single():
    return {"model": run_model_cases(), "cache": run_cache_case(sp=False)}


@pytest.mark.parametrize("world", [2, 4])
def test_13_model_and_cache_same_on_any_number_of_ranks(single, world):
    results = run_distributed(worker, world, world == 2)
    for rank, res in enumerate(results):
        for name in CASES:
            want = single["model"][name]
            diff = (res["model"][name] - want).abs().max().item()
            assert diff <= TOL * max(1.0, want.abs().max().item()), (name, rank, world, diff)
        out, labels = res["cache"]
        assert labels == single["cache"][1]
        torch.testing.assert_close(out, single["cache"][0], rtol=1e-4, atol=1e-4)
    if world == 2:
        per_step, labels = results[0]["collectives"]
        depth = 2
        for step, (label, calls) in enumerate(zip(labels, per_step)):
            inside = [n for n, on in calls if on]
            if label in ("full", "full (cross-attn reused)"):
                # spatial attention and temporal window attention: one all-to-all there and
                # one back, per block
                assert inside == ["all_to_all_single"] * (4 * depth), (step, label, inside)
            else:
                assert inside == [], (step, label, inside)
            assert [n for n, on in calls if not on] == ["all_gather"], (step, calls)
        assert "conservative" in labels and "aggressive" in labels
