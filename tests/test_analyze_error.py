"""tools/analyze_error.py on the tiny cpu preset and the tiny config: JSON fields, zero error
for the none policy, the step loop reproduces RFlow.sample, and the claim test's variants."""
from __future__ import annotations

import json
import os

import pytest
import torch

from opensora_duca.bench import error_analysis as ea
from opensora_duca.bench.benches import build_bench
from opensora_duca.cli.analyze_error import main
from opensora_duca.cli.benchmark import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CONFIG = os.path.join(ROOT, "configs", "tiny", "inference.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ae")
    assert main(["--preset", "cpu", "--tiny", "--steps", "6", "--samples", "2",
                    "--policies", "none,DuCa,ToCa,FORA,PAB,TrunkReuse", "--out", str(out),
                    "--threads", "1", "--device", "cpu"]) == 0
    with open(out / "error_analysis.json") as f:
        return json.load(f), out


def test_fields_and_plots(report):
    rep, out = report
    assert rep["num_steps"] == 6 and rep["samples"] == 2
    assert set(rep["policies"]) == {"none", "DuCa", "ToCa", "FORA", "PAB", "TrunkReuse"}
    for name, r in rep["policies"].items():
        for key in ("output_rel_l2", "guided_rel_l2", "trunk_rel_l2"):
            assert len(r["per_step"][key]) == 6, (name, key)
        assert len(r["step_labels"]) == 6
        assert len(r["free_running"]["z_rel_l2"]) == 6
        for key in ("final_rel_l2", "final_psnr"):
            assert key in r["free_running"]
    for name in ("per_step_error.png", "accumulated_error.png", "claim_test.png"):
        assert os.path.getsize(out / name) > 0


def test_none_has_zero_error(report):
    r = report[0]["policies"]["none"]
    for key in ("output_rel_l2", "guided_rel_l2", "trunk_rel_l2"):
        assert r["per_step"][key] == [0.0] * 6
    assert r["free_running"]["z_rel_l2"] == [0.0] * 6
    assert r["free_running"]["final_psnr"] == 100.0


def test_cached_steps_have_error_full_steps_none(report):
    r = report[0]["policies"]["DuCa"]
    errs, labels = r["per_step"]["output_rel_l2"], r["step_labels"]
    for e, lab in zip(errs, labels):
        if lab == "full":
            assert e == 0.0
    assert errs[labels.index("aggressive")] > 0 and errs[labels.index("conservative")] > 0
    assert r["free_running"]["final_rel_l2"] > 0


def test_claim_test(report):
    c = report[0]["claim_test"]
    assert c["starts"] == [3]
    v = c["variants"]
    assert set(v) == {"A+C", "R+C", "C+C same cost", "C+C", "C+A", "A+A", "F+F"}
    assert v["F+F"]["err_mean"] < 1e-6  # control: the scripted full steps are the reference
    assert v["A+A"]["cost_full_step_equivalents"] == 0.0
    assert abs(v["A+C"]["cost_full_step_equivalents"]
               - v["C+C same cost"]["cost_full_step_equivalents"]) < 0.01
    assert c["comparison"]["lower_error_same_cost"] in ("A+C", "C+C same cost")


def test_stepper_matches_rflow_sample():
    torch.set_num_threads(1)
    ns = build_parser().parse_args(["--preset", "cpu", "--tiny", "--steps", "4",
                                       "--device", "cpu"])
    bench = build_bench(ns)
    st = ea.Stepper(bench)
    ref = ea.reference(bench, st)
    assert torch.equal(ref["zs"][-1], bench.sample())


def test_config_input_and_bad_args(tmp_path):
    torch.set_num_threads(1)
    assert main([TINY_CONFIG, "--steps", "4", "--samples", "2", "--policies", "none,DuCa",
                    "--no-claim", "--out", str(tmp_path), "--device", "cpu"]) == 0
    rep = json.load(open(tmp_path / "error_analysis.json"))
    assert "claim_test" not in rep and rep["policies"]["none"]["per_step"]["output_rel_l2"] == [0.0] * 4
    with pytest.raises(ValueError, match="--starts"):
        ea.parse_starts("5", 6)
    with pytest.raises(SystemExit, match="exactly one"):
        main(["--out", str(tmp_path)])
