"""Upstream Open-Sora's own sampling loops (tests/upstream_samplers.py: RFLOW.sample of v1.2.0
and v1.3, no session) on the upstream-shaped doubles with the cache of the shipped plugin
configs: text-to-video, 1.2's frame-conditioned loop and 1.3's i2v with and without SDEdit are
each recognised as one run, follow the same plan as a session would (DuCa at 30 steps: 7 full,
5 with cross-attention reused, 9 conservative, 9 aggressive) and give this project's model's
output under the same loop; a genuinely new run still starts fresh."""
from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from cache_utils import inputs as small_inputs
from mmengine.config import Config
from test_upstream_double import double as double_v12
from test_upstream_double import inputs as inputs_v12
from test_upstream_double import ours as ours_v12
from test_upstream_double import rel_err
from test_upstream_double_v13 import pair as pair_v13
from upstream_samplers import rflow_v12, rflow_v13

from opensora_duca.cache import apply_cache, build_policy, remove_cache

STEPS = 30
ROOT = __file__.rsplit("/tests/", 1)[0]
SHIPPED = {"1.2": f"{ROOT}/configs/opensora-v1-2/opensora_run/inference_duca.py",
           "1.3": f"{ROOT}/configs/opensora-v1-3/opensora_run/inference_duca.py"}
KW12 = dict(fps=torch.tensor([24.0]), height=torch.tensor([64.0, 64.0]),
            width=torch.tensor([80.0, 80.0]), num_frames=torch.tensor([3.0, 3.0]),
            ar=torch.tensor([0.8, 0.8]))
KW13 = dict(fps=torch.tensor([24.0]), height=torch.tensor([256.0]), width=torch.tensor([320.0]))


def shipped_cache(version):
    return Config.fromfile(SHIPPED[version], import_custom_modules=False).model.cache.to_dict()


def plan_counts(cfg):
    policy = build_policy(cfg)
    ts = [1000.0 * (1 - i / STEPS) for i in range(STEPS)]
    return Counter(str(policy.plan(i, STEPS, ts[:i + 1]).label) for i in range(STEPS))


def cached(model, cfg, loop, **kw):
    mgr = apply_cache(model, cfg)
    z = loop(model, **kw)
    stats = mgr.stats()
    remove_cache(model)
    return z, stats


def v12_case(frame_mask):
    x, y, mask = inputs_v12()
    y_null = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    fm = None if frame_mask is None else torch.tensor(frame_mask, dtype=x.dtype)
    return dict(z=x, y=y, y_null=y_null, mask=mask, steps=STEPS, frame_mask=fm, **KW12)


V12_CASES = {"t2v": None, "reference_frames": [[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]],
             "soft_reference": [[0.5, 1.0, 1.0], [0.0, 1.0, 0.7]]}


@pytest.mark.parametrize("case", list(V12_CASES))
def test_upstream_v12_loops_cache_as_one_run(case):
    cfg = shipped_cache("1.2")
    kw = v12_case(V12_CASES[case])
    z_double, st = cached(double_v12(), cfg, rflow_v12, **kw)
    z_ours, st_ours = cached(ours_v12(), cfg, rflow_v12, **kw)
    assert st["runs"] == 1 and Counter(st["step_labels"]) == plan_counts(cfg)
    assert Counter(st["step_labels"]) == {"full": 7, "full (cross-attn reused)": 5,
                                          "conservative": 9, "aggressive": 9}
    assert st_ours["step_labels"] == st["step_labels"]
    assert rel_err(z_double, z_ours) < 1e-5  # the two models agree to this (uncached, too)
    assert rel_err(z_double, rflow_v12(double_v12(), **kw)) > 1e-4  # the steps were cached
    if kw["frame_mask"] is not None:  # reference frames stay at their latents
        held = kw["frame_mask"] == 0
        ref = kw["z"].permute(0, 2, 1, 3, 4)[held]
        assert torch.equal(z_double.permute(0, 2, 1, 3, 4)[held], ref)


def v13_case(mode):
    x, y, mask = small_inputs(batch=1, h=6, w=10)
    y_null = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    kw = dict(z=x, y=y, y_null=y_null, mask=mask, steps=STEPS, **KW13)
    if mode != "t2v":
        cm = torch.zeros_like(x)
        cm[:, :, 0] = 1.0
        z_cond = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
        kw.update(z_cond=z_cond, z_cond_mask=cm, mask_index=[0], use_sdedit=mode == "i2v_sdedit")
    return kw


@pytest.mark.parametrize("mode", ["t2v", "i2v", "i2v_sdedit"])
def test_upstream_v13_loops_cache_as_one_run(mode):
    cfg = shipped_cache("1.3")
    ours, double = pair_v13()
    ours, double = ours.double(), double.double()
    kw = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
          for k, v in v13_case(mode).items()}
    z_double, st = cached(double, cfg, rflow_v13, **kw)
    z_ours, st_ours = cached(ours, cfg, rflow_v13, **kw)
    assert st["runs"] == 1 and Counter(st["step_labels"]) == plan_counts(cfg)
    assert st_ours["step_labels"] == st["step_labels"]
    assert rel_err(z_double, z_ours) < 1e-5
    assert rel_err(z_double, rflow_v13(double, **kw)) > 1e-4


def test_new_noise_at_a_lower_timestep_starts_a_new_run_and_says_so_once(recwarn):
    """A genuinely new run whose first timestep is below the last one (fresh noise, same
    captions, an SDEdit-style start) is not mistaken for a continuation: the cache starts
    over, stale features are not reused, and it warns once."""
    cfg = shipped_cache("1.2")
    model = ours_v12()
    mgr = apply_cache(model, cfg)
    kw = v12_case(V12_CASES["reference_frames"])
    fresh = torch.randn(kw["z"].shape, dtype=kw["z"].dtype,
                        generator=torch.Generator().manual_seed(5))
    rflow_v12(model, **dict(kw, last=12))
    rflow_v12(model, **dict(kw, z=fresh, first=12))
    labels = mgr.stats()["step_labels"]
    assert mgr.stats()["runs"] == 2 and len(labels) == 30
    assert labels[12:15] == ["full"] * 3  # the new run's warmup: nothing stale reused
    split = [w for w in recwarn.list if "does not continue the previous step" in str(w.message)]
    assert len(split) == 1
    remove_cache(model)


def test_every_finished_run_logs_its_report_once(caplog):
    """Inside another program (the wrapper sets log_runs), each finished run logs one line and
    the table on rank 0; a run where nothing could be cached gives the reason."""
    cfg = shipped_cache("1.2")
    model = ours_v12()
    mgr = apply_cache(model, cfg)
    mgr.log_runs = True
    kw = v12_case(None)
    with caplog.at_level(logging.INFO, logger="opensora_duca.cache"):
        rflow_v12(model, **kw)
        rflow_v12(model, **kw)  # starts at t=1000 again: the first run is finished
        records = [r.getMessage() for r in caplog.records]
        assert len(records) == 1
        assert records[0].startswith("opensora_duca cache: run 1 finished: DuCa, 30 steps, 2.")
        assert "9 aggressive" in records[0] and "peak cache mem" in records[0]
        remove_cache(model)  # detaching finishes the second run
        assert len(caplog.records) == 2

    mgr = apply_cache(model, cfg)
    mgr.log_runs = True
    with caplog.at_level(logging.INFO, logger="opensora_duca.cache"), \
            pytest.warns(RuntimeWarning, match="does not continue"):
        caplog.clear()
        x, y, mask = inputs_v12()
        for i in range(4):  # new noise at every step: nothing can be cached
            z = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(i))
            with torch.no_grad():
                model(torch.cat([z, z]), torch.full((4,), 900.0 - 100 * i, dtype=x.dtype),
                      torch.cat([y, y]), mask=mask, **KW12)
        remove_cache(model)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 4 and all("no step cached : runs were split" in n for n in notes[1:])


def _own_sampler_labels(model, **kw):
    from opensora_duca.schedulers.rflow import RFlow

    cfg = shipped_cache("1.3")
    mgr = apply_cache(model, cfg)  # no session: as a user's own loop around our sampler
    with torch.no_grad():
        RFlow(num_sampling_steps=STEPS, cfg_scale=7.0).sample(model, progress=False, **kw)
    stats = mgr.stats()
    remove_cache(model)
    return stats, plan_counts(cfg)


def test_our_sampler_conditioned_loops_cache_as_one_run():
    """This project's rflow: its frame-conditioned loop (x_cond / cond_mask) and its 1.3 i2v
    loop with SDEdit run sessionless follow the same plan as text-to-video."""
    x, y, mask = inputs_v12()
    y_null = torch.zeros_like(y)
    cond = dict(x_cond=torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator()
                                   .manual_seed(3)),
                cond_mask=torch.tensor([[0.0, 1.0, 1.0], [0.5, 1.0, 1.0]], dtype=x.dtype))
    stats, want = _own_sampler_labels(ours_v12(), z=x, y=y, y_null=y_null, mask=mask, **cond)
    assert stats["runs"] == 1 and Counter(stats["step_labels"]) == want
    ours, _ = pair_v13()
    kw = v13_case("i2v_sdedit")
    stats, want = _own_sampler_labels(
        ours, z=kw["z"], y=kw["y"], y_null=kw["y_null"], mask=kw["mask"], z_cond=kw["z_cond"],
        mask_index=kw["mask_index"], use_sdedit=True,
        additional_args=dict(fps=KW13["fps"], height=KW13["height"], width=KW13["width"]))
    assert stats["runs"] == 1 and Counter(stats["step_labels"]) == want
