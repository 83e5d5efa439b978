"""``--policies`` takes configs: ``NAME:key=value,...`` items and a JSON list, checked before
anything is built (one line, exit 2); plain names keep working; tools/benchmark.py runs a
config under its label."""
import json
import re

import pytest

from opensora_duca.bench.measure import parse_policies, policy_config, policy_label
from opensora_duca.cli.benchmark import main


def test_names_and_configs():
    assert parse_policies("DuCa") == ["none", "DuCa"]
    assert parse_policies("DuCa,none", configs=True) == ["none", "DuCa"]
    got = parse_policies("none,DuCa,FORA:interval=6,warmup_steps=2,TeaCache:threshold=0.2",
                         configs=True)
    assert got == ["none", "DuCa", {"type": "FORA", "interval": 6, "warmup_steps": 2},
                   {"type": "TeaCache", "threshold": 0.2}]
    got = parse_policies('["DuCa", {"type": "FORA", "forecast": {"order": 1}}]', configs=True)
    assert got == ["none", "DuCa", {"type": "FORA", "forecast": {"order": 1}}]
    assert policy_label(got[2]) == 'FORA:forecast={"order":1}'
    assert policy_config("DuCa") == {"type": "DuCa"}
    # a config without keys is the plain name
    assert parse_policies('[{"type": "FORA"}]', configs=True) == ["none", "FORA"]


@pytest.mark.parametrize("text, match", [
    ("FORA:interval=0", r"FORA:interval=0.*interval=0 is invalid; accepted: an integer >= 1"),
    ("FORA:bogus=1", r"unknown key 'bogus'"),
    ("interval=3", r"--policies='interval=3' is not accepted"),
    ("FORA:interval=3,interval=4", r"each key once"),
    ("DuCa,DuCa", r"each policy at most once"),
    ("[1]", r"JSON list"),
    ("[bad json", r"JSON list"),
    ("Nope:x=1", r"registered policies"),
])
def test_bad_configs_one_line(text, match):
    with pytest.raises(ValueError, match=match) as err:
        parse_policies(text, configs=True)
    assert "\n" not in str(err.value)


def test_names_only_callers_refuse_configs():
    with pytest.raises(ValueError, match="registered policies"):
        parse_policies("FORA:interval=3")


def test_cli_runs_a_config_and_refuses_a_bad_one(tmp_path, capsys):
    js = str(tmp_path / "r.json")
    assert main(["--preset", "cpu", "--tiny", "--steps", "4", "--repeat", "1", "--device", "cpu",
                 "--threads", "1", "--quiet", "--json", js,
                 "--policies", "FORA:interval=2,warmup_steps=1"]) == 0
    rows = {r["policy"]: r for r in json.load(open(js))["results"]}
    row = rows["FORA:interval=2,warmup_steps=1"]
    assert row["policy_config"]["interval"] == 2 and row["policy_config"]["warmup_steps"] == 1
    assert row["steps_by_kind"] == {"full": 3, "reuse": 1}  # step 0 (warm-up), 1, 3 full
    capsys.readouterr()
    assert main(["--preset", "cpu", "--tiny", "--device", "cpu",
                 "--policies", "FORA:interval=-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search("interval=-1 is invalid", err), err
