"""The cache under sequence parallelism (gloo, CPU): the same output for 1, 2 and 4 ranks, and
no collective inside the trunk on cached steps."""
from __future__ import annotations

import pytest
import torch
from cache_utils import inputs, small_model, trajectory
from dist_utils import observe_collectives, run_distributed

from opensora_duca.cache import apply_cache, remove_cache

STEPS = 10
CASES = {  # name -> (cache cfg, latent H, W)
    "duca_vnorm": (dict(type="DuCa"), 8, 10),
    "duca_random": (dict(type="DuCa", scorer="random"), 8, 10),
    "duca_vnorm_padded_rows": (dict(type="DuCa"), 6, 10),  # 3 latent rows
    "duca_shared_cfg": (dict(type="DuCa", cfg_shared_selection=True, warmup_steps=1), 8, 10),
}


def _run_cases(sp: bool):
    out = {}
    for name, (cfg, h, w) in CASES.items():
        m = small_model(enable_sequence_parallelism=sp)
        x, y, mask = inputs(h=h, w=w)  # B = 2: a CFG-like batch with different captions
        mgr = apply_cache(m, cfg)
        with mgr.session(num_steps=STEPS):
            out[name] = torch.stack(trajectory(m, x, y, mask, steps=STEPS))
            out[name + ":labels"] = mgr.stats()["step_labels"]
        remove_cache(m)
    return out


def _worker(rank, world, count_collectives):
    if not count_collectives:
        return _run_cases(sp=True)
    calls = []
    in_trunk = {"on": False}
    with observe_collectives(lambda name, kw: calls.append((name, in_trunk["on"]))):
        m = small_model(enable_sequence_parallelism=True)
        x, y, mask = inputs()
        first, last = m.spatial_blocks[0], m.temporal_blocks[-1]
        per_step = []
        mgr = apply_cache(m, dict(type="DuCa"))
        # hooks on the block *modules* wrap the patched forwards: they mark the trunk
        first.register_forward_pre_hook(lambda *a: in_trunk.__setitem__("on", True))
        last.register_forward_hook(lambda *a: in_trunk.__setitem__("on", False))
        with mgr.session(num_steps=STEPS), torch.no_grad():
            for i in range(STEPS):
                calls.clear()
                t = torch.full((2,), 1000.0 * (1 - i / STEPS))
                m(x, t, y, mask=mask)
                per_step.append(list(calls))
            labels = mgr.stats()["step_labels"]
        remove_cache(m)  # breaks the model <-> manager cycle
    return {"per_step": per_step, "labels": labels}


@pytest.fixture(scope="module")
def single():
    return _run_cases(sp=False)


@pytest.mark.parametrize("world", [2, 4])
def test_same_output_for_any_number_of_ranks(single, world):
    results = run_distributed(_worker, world, False)
    for name in CASES:
        assert results[0][name + ":labels"] == single[name + ":labels"]
        for r in range(world):
            torch.testing.assert_close(results[r][name], single[name], rtol=1e-4, atol=1e-4,
                                       msg=lambda s: f"{name}, rank {r} of {world}: {s}")


def test_cached_steps_issue_no_collectives_inside_the_trunk():
    res = run_distributed(_worker, 2, True)[0]
    depth = 2
    for step, (labels, calls) in enumerate(zip(res["labels"], res["per_step"])):
        inside = [n for n, on in calls if on]
        outside = [n for n, on in calls if not on]
        assert outside == ["all_gather"], (step, outside)  # gathering rows before the final layer
        if labels in ("full", "full (cross-attn reused)"):
            # spatial self-attention only: one all-to-all there and one back, per block
            assert inside == ["all_to_all_single"] * (2 * depth), (step, labels, inside)
        else:
            assert inside == [], (step, labels, inside)
    assert "conservative" in res["labels"] and "aggressive" in res["labels"]
