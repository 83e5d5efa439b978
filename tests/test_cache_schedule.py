"""FORA / TrunkReuse ``schedule=``: the computed steps named explicitly. The plan computes
exactly there; a schedule equal to an interval's steps samples bitwise what the interval does;
bad schedules, a schedule beside a non-default interval and a schedule past the run's steps are
refused in one line naming the key."""
from __future__ import annotations

import pytest
import torch
from cache_utils import small_model
from test_cache_batch import STEPS, clips

from opensora_duca.cache import apply_cache, build_policy, remove_cache


@torch.no_grad()
def sample(model, cfg):
    z, y, y_null, mask = clips()
    z, y, mask = z[:2], y[:2], mask[:2]
    mgr = apply_cache(model, cfg)
    try:
        with mgr.session(num_steps=STEPS):
            for i in range(STEPS):
                t = torch.full((4,), 1000.0 * (1 - i / STEPS))
                out = model(torch.cat([z, z]), t, torch.cat([y, y_null.expand(2, -1, -1, -1)]),
                            mask=torch.cat([mask, mask]))
                c, u = out[:, :4].chunk(2)
                z = z + (u + 4.0 * (c - u)) * (1.0 / STEPS)
        return z, mgr.stats()["step_labels"]
    finally:
        remove_cache(model)


@pytest.mark.parametrize("typ", ["FORA", "TrunkReuse"])
def test_the_plan_computes_exactly_the_scheduled_steps(typ):
    sched = [0, 5, 11, 18, 25]
    pol = build_policy(dict(type=typ, schedule=sched, forecast=dict(order=1)))
    computed = [s for s in range(30) if pol.plan(s, 30, []).is_full()]
    assert computed == sched and pol.skips_trunk() == (typ == "TrunkReuse")


@pytest.mark.parametrize("typ", ["FORA", "TrunkReuse"])
def test_an_interval_schedule_samples_as_the_interval(typ):
    model = small_model(depth=2)
    interval = dict(type=typ, interval=3, forecast=dict(order=1))
    sched = dict(type=typ, schedule=list(range(0, STEPS, 3)), forecast=dict(order=1))
    (z_i, lab_i), (z_s, lab_s) = sample(model, interval), sample(model, sched)
    assert lab_i == lab_s and "full" in lab_i and len(set(lab_i)) == 2
    assert torch.equal(z_i, z_s)


@pytest.mark.parametrize("cfg, match", [
    (dict(schedule=[1, 3]), "schedule=\\[1, 3\\]"),
    (dict(schedule=[0, 3, 3]), "schedule=\\[0, 3, 3\\]"),
    (dict(schedule="0,3"), "schedule='0,3'"),
    (dict(schedule=[0, 2.5]), "schedule=\\[0, 2.5\\]"),
    (dict(schedule=[0, 4], interval=4), "interval=4"),
    (dict(schedule=[0, 4], warmup_steps=2), "warmup_steps=2")])
def test_bad_schedules_are_refused_in_one_line(cfg, match):
    with pytest.raises(ValueError, match=match) as err:
        build_policy(dict(type="FORA", **cfg))
    assert "\n" not in str(err.value)


def test_a_schedule_past_the_runs_steps_is_refused():
    pol = build_policy(dict(type="FORA", schedule=[0, 5, 40]))
    with pytest.raises(ValueError, match="schedule=\\[0, 5, 40\\].*num_steps=30"):
        pol.validate_run(30)
    pol.validate_run(41)


def test_a_schedule_for_n_steps_scales_to_the_run():
    """schedule_steps=30: a run of 8 steps computes round(s * 8 / 30) of each index; a run of
    30 the schedule as written; the run is not refused for its length."""
    pol = build_policy(dict(type="FORA", schedule=[0, 6, 13, 20, 26], schedule_steps=30,
                            forecast=dict(order=1)))
    pol.validate_run(8)
    assert [s for s in range(8) if pol.plan(s, 8, []).is_full()] == [0, 2, 3, 5, 7]
    assert [s for s in range(30) if pol.plan(s, 30, []).is_full()] == [0, 6, 13, 20, 26]
    assert pol.describe()["schedule_steps"] == 30


@pytest.mark.parametrize("cfg, match", [
    (dict(schedule_steps=30), "schedule_steps=30"),
    (dict(schedule=[0, 6, 13], schedule_steps=13), "schedule_steps=13"),
    (dict(schedule=[0, 6], schedule_steps="30"), "schedule_steps='30'")])
def test_bad_schedule_steps_are_refused_in_one_line(cfg, match):
    with pytest.raises(ValueError, match=match) as err:
        build_policy(dict(type="FORA", **cfg))
    assert "\n" not in str(err.value)
