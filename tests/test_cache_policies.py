"""Policy configs as frozen dataclasses: keys, validation, describe(), plans that depend only
on their arguments, and the exact trunk-skip test."""
from __future__ import annotations

import dataclasses

import pytest

from opensora_duca.cache import (
    FORA,
    PAB,
    Action,
    DuCa,
    Kind,
    Scorer,
    StepKind,
    ToCa,
    TrunkReuse,
    build_policy,
)
from opensora_duca.cache.policies import accepted_keys
from opensora_duca.registry import CACHES, registered


def test_every_registered_policy_is_a_frozen_dataclass_and_describe_round_trips():
    for name in registered(CACHES):
        cls = CACHES.get(name)
        assert dataclasses.is_dataclass(cls), name
        pol = build_policy(dict(type=name))
        with pytest.raises(dataclasses.FrozenInstanceError):
            pol.stored_dtype = "bf16"
        desc = pol.describe()
        assert desc["type"] == name
        assert set(desc) - {"type"} == set(accepted_keys(cls))
        assert build_policy(desc) == pol  # describe() is a config that builds the same policy


def test_dict_form_and_object_form_are_the_same_policy():
    assert build_policy(dict(type="DuCa", fresh_ratio=0.2, cycles=dict(mlp=4))) == \
        DuCa(fresh_ratio=0.2, cycles={"mlp": 4})
    p = DuCa(scorer="random", tables=dict(mlp=["full", "conservative", "aggressive"]))
    assert p.scorer is Scorer.RANDOM and p.tables[Kind.MLP][2] == "aggressive"
    assert p.cycles == {Kind.SPATIAL_ATTN: 3, Kind.TEMPORAL_ATTN: 3, Kind.CROSS_ATTN: 6,
                        Kind.MLP: 3}


@pytest.mark.parametrize("make, match", [
    (lambda: DuCa(fresh_ratio=True), "fresh_ratio=True"),
    (lambda: DuCa(ratio_factors=dict(spatial_attn=2.0)), "ratio_factors.spatial_attn"),
    (lambda: DuCa(ratio_schedule=dict(type="linear", decay=0.5)), "ratio_schedule.decay"),
    (lambda: DuCa(ratio_schedule=dict(type="cosine")), "ratio_schedule.type"),
    (lambda: DuCa(final_step="last"), "final_step"),
    (lambda: ToCa(tables=dict(mlp=["full", "aggressive", "conservative"])), "tables.mlp"),
    (lambda: FORA(interval=1.5), "interval"),
    (lambda: TrunkReuse(warmup_steps=-1), "warmup_steps"),
    (lambda: PAB(cross_range=0), "cross_range"),
    (lambda: PAB(timestep_window=(100,)), "timestep_window"),
])
def test_validation_names_the_key_and_the_accepted_values(make, match):
    with pytest.raises(ValueError, match=match) as e:
        make()
    assert "accepted" in str(e.value)


def test_pab_plan_depends_only_on_its_arguments():
    """The window start is read from the run's timesteps, so one policy object answers two
    interleaved runs correctly."""
    pab = PAB(spatial_range=2, temporal_range=3, cross_range=4, timestep_window=(450, 930))
    run_a = [1000.0, 950.0, 900.0, 850.0, 800.0, 750.0]   # window entered at step 2
    run_b = [920.0, 870.0, 820.0]                          # window entered at step 0
    plans_a = [pab.plan(s, 6, run_a[:s + 1]) for s in range(6)]
    plans_b = [pab.plan(s, 3, run_b[:s + 1]) for s in range(3)]
    again_a = [pab.plan(s, 6, run_a[:s + 1]) for s in range(6)]
    assert plans_a == again_a
    assert [p.label for p in plans_a] == ["full", "full", "full", "broadcast", "broadcast",
                                          "broadcast"]
    # j = step - first step in the window; spatial every 2, temporal every 3, cross every 4
    assert plans_a[4].actions[Kind.SPATIAL_ATTN] == Action.FULL  # j = 2
    assert plans_a[5].actions[Kind.TEMPORAL_ATTN] == Action.FULL  # j = 3
    assert plans_b[2].actions[Kind.SPATIAL_ATTN] == Action.FULL  # j = 2
    assert all(p.actions[Kind.MLP] == Action.FULL for p in plans_a + plans_b)


def test_skips_trunk_is_exact_beyond_any_fixed_window():
    """All four kinds are aggressive together only at steps s = 419 mod 420 (lcm of 4, 5, 6, 7):
    the policy skips the trunk, which a scan of a few cycles would miss."""
    cycles = dict(spatial_attn=4, temporal_attn=5, cross_attn=6, mlp=7)
    tables = {k: ["full"] + ["conservative"] * (c - 2) + ["aggressive"] for k, c in cycles.items()}
    pol = DuCa(cycles=cycles, tables=tables)
    assert pol.skips_trunk()
    steps = [s for s in range(3, 900) if pol.plan(s, None, [0.0] * (s + 1)).skip_trunk]
    assert steps == [419, 839]
    assert all(pol.skips_trunk_at(s, None) == (s in steps) for s in range(900))
    tables["mlp"] = ["full"] + ["conservative"] * 6
    assert not DuCa(cycles=cycles, tables=tables).skips_trunk()


def test_step_kinds_are_enums_that_read_as_names():
    labels = [str(DuCa().plan(s, 30, [0.0] * (s + 1)).label) for s in range(7)]
    assert labels == ["full", "full", "full", "full (cross-attn reused)", "conservative",
                      "aggressive", "full"]
    assert StepKind.CONSERVATIVE == "conservative" and f"{Kind.MLP}" == "mlp"


def test_every_field_of_every_policy_is_checked_with_a_message_naming_it():
    """Validation is declared per field (or, for TeaCache's calibration trio, checked
    together): a value no field accepts fails naming the policy, the key, the value and what is
    accepted."""
    for name in registered(CACHES):
        for key in accepted_keys(CACHES.get(name)):
            with pytest.raises(ValueError) as e:
                build_policy({"type": name, key: "bogus"})
            assert f"cache policy {name!r}: {key}='bogus' is invalid; accepted: " in \
                str(e.value), (name, key, str(e.value))


def test_taylorseer_plans_are_foras_with_forecasting():
    from opensora_duca.cache import TaylorSeer

    for kw in (dict(), dict(interval=3, warmup_steps=2), dict(interval=1, order=0),
               dict(interval=4, order=1, distance="timestep", warmup_steps=0)):
        ts = TaylorSeer(**kw)
        fora = FORA(interval=ts.interval, warmup_steps=ts.warmup_steps,
                    forecast=dict(order=ts.order, distance=ts.distance))
        steps = range(25)
        assert [ts.plan(s, 25, [0.0] * (s + 1)) for s in steps] == \
            [fora.plan(s, 25, [0.0] * (s + 1)) for s in steps], kw
        assert (ts.forecast_order, ts.forecast_distance, ts.reuses(Kind.MLP)) == \
            (fora.forecast_order, fora.forecast_distance, fora.reuses(Kind.MLP))
    assert TaylorSeer().describe() == {"type": "TaylorSeer", "interval": 5, "order": 2,
                                       "warmup_steps": 3, "distance": "step",
                                       "stored_dtype": None}


def test_couples_cfg_halves_is_a_policy_property():
    from opensora_duca.parallel.cfg import check_cache_policy

    coupling = {name: build_policy(dict(type=name)).couples_cfg_halves
                for name in registered(CACHES)}
    assert coupling == {name: name in ("TeaCache", "FirstBlockCache", "EasyCache", "SpeCa")
                        for name in coupling}
    assert DuCa(cfg_shared_selection=True).couples_cfg_halves
    assert ToCa(cfg_shared_selection=True).couples_cfg_halves
    assert build_policy(dict(type="VerifiedDuCa", verify_threshold=0.1)).couples_cfg_halves

    class Other:  # any object with the property: read duck-typed, no cache import
        name, couples_cfg_halves, cfg_shared_selection = "Other", True, False

    with pytest.raises(ValueError, match="cache type='Other' is not accepted with cfg_parallel"):
        check_cache_policy(Other())
    check_cache_policy(DuCa())


def test_adaptive_policies_keep_a_typed_run_state():
    from opensora_duca.cache.policies import AdaptiveState, TeaCacheState

    tea = build_policy(dict(type="TeaCache", threshold=0.1))
    state = tea.new_state()
    assert state == TeaCacheState(accumulated=0.0)
    changes = [None, 0.04, 0.04, 0.04, 0.01]
    decisions = [tea.decide(s, 10, c, state) for s, c in enumerate(changes)]
    assert decisions == [True, False, False, True, False]  # 0.12 >= 0.1 at step 3
    assert state.accumulated == pytest.approx(0.01)
    assert tea.new_state() == TeaCacheState()  # a fresh state per group and run
    fbc = build_policy(dict(type="FirstBlockCache", threshold=0.05))
    assert type(fbc.new_state()) is AdaptiveState
    assert [fbc.decide(s, 10, c, fbc.new_state()) for s, c in
            enumerate([None, 0.01, 0.06])] == [True, False, True]


def test_build_policy_lives_with_the_policies():
    from opensora_duca.cache.policies import build_policy as from_policies

    assert from_policies(None) == build_policy(None)
    assert from_policies(dict(type="DuCa", fresh_ratio=0.2)) == DuCa(fresh_ratio=0.2)
    with pytest.raises(KeyError, match="unknown cache policy type 'Nope'; registered"):
        from_policies(dict(type="Nope"))
    with pytest.raises(ValueError, match=r"unknown key 'bogus'=1; accepted keys: \['cfg_shared"):
        from_policies(dict(type="DuCa", bogus=1))
    with pytest.raises(ValueError, match="must be a dict with a 'type' key"):
        from_policies(dict(fresh_ratio=0.2))


def test_calibration_file_errors_come_from_the_calibrator(tmp_path):
    from opensora_duca.cache.calibrate import CalibrationFileError, load_calibration

    empty = tmp_path / "empty.json"
    empty.write_text('{"coefficients": []}')
    with pytest.raises(CalibrationFileError, match="a non-empty 'coefficients' list"):
        load_calibration(str(empty))
    with pytest.raises(ValueError, match=r"cache policy 'TeaCache': calibration='.*empty.json' "
                                         r"is invalid; accepted: a non-empty 'coefficients'"):
        build_policy(dict(type="TeaCache", calibration=str(empty)))
    good = tmp_path / "good.json"
    good.write_text('{"coefficients": [1, 2], "x_range": [0, 1]}')
    assert load_calibration(str(good)) == ((1.0, 2.0), (0.0, 1.0))


def test_plain_reads_a_config_as_plain_data():
    from mmengine.config import ConfigDict

    from opensora_duca.utils.config import plain

    cfg = ConfigDict(type="DuCa", ratio_schedule=ConfigDict(type="linear"))
    out = plain(cfg)
    assert out == {"type": "DuCa", "ratio_schedule": {"type": "linear"}}
    assert type(out) is dict and type(out["ratio_schedule"]) is dict
    marker = object()
    assert plain(marker) is marker and plain(None) is None
