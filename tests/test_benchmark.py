"""tools/benchmark.py (opensora_duca.cli.benchmark): every field for every policy on the (tiny)
cpu preset, the reference row, DuCa's analytic saving, input validation, and the demo preset
when its model is shipped."""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

from opensora_duca.bench.benches import demo_available
from opensora_duca.bench.measure import fidelity, parse_policies
from opensora_duca.bench.report import markdown_table
from opensora_duca.cli.benchmark import main

FIELDS = ("policy", "median_s", "times_s", "speedup", "flops_ratio", "peak_cache_bytes",
          "peak_mem_bytes", "bookkeeping_s", "bookkeeping_frac", "psnr", "ssim", "step_kinds",
          "syncs_per_run")
POLICIES = ["none", "DuCa", "ToCa", "FORA", "PAB"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("bench")
    js, png = str(d / "bench.json"), str(d / "bench.png")
    assert main(["--preset", "cpu", "--tiny", "--steps", "6", "--repeat", "2",
                    "--policies", ",".join(POLICIES), "--json", js, "--plot", png,
                    "--threads", "1", "--quiet", "--device", "cpu"]) == 0
    with open(js) as f:
        rep = json.load(f)
    return rep, png


def test_every_field_for_every_policy(report):
    rep, png = report
    for key in ("device", "preset", "torch", "results"):
        assert key in rep
    assert rep["preset"] == "cpu-tiny" and rep["device"].startswith("cpu")
    assert [r["policy"] for r in rep["results"]] == POLICIES
    for r in rep["results"]:
        for f in FIELDS:
            assert f in r, (r["policy"], f)
        assert len(r["times_s"]) == 2 and r["median_s"] > 0
        assert r["peak_cache_bytes"] >= 0 and r["bookkeeping_s"] >= 0
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
        assert math.isfinite(r["psnr"])
        assert r["ssim"] is None  # the tiny latent is 8x8, below SSIM's 11x11 window
    assert os.path.getsize(png) > 0


def test_reference_and_duca_rows(report):
    rows = {r["policy"]: r for r in report[0]["results"]}
    none = rows["none"]
    assert none["speedup"] == 1.0 and none["psnr"] == 100.0 and none["flops_ratio"] == 1.0
    assert none["peak_cache_bytes"] == 0
    duca = rows["DuCa"]
    assert duca["flops_ratio"] > 1.0 and duca["peak_cache_bytes"] > 0
    assert duca["steps_by_kind"] == {"full": 3, "full (cross-attn reused)": 1,
                                     "conservative": 1, "aggressive": 1}
    assert duca["psnr"] < 100.0  # caching changes the result


def test_markdown_table(report):
    table = markdown_table(report[0])
    assert table.count("\n") == 1 + len(POLICIES)
    assert "| DuCa |" in table


def test_fidelity_ssim_on_large_latents():
    z = torch.randn(1, 4, 2, 12, 12)
    f = fidelity(z, z)
    assert f["psnr"] == 100.0 and abs(f["ssim"] - 1.0) < 1e-12 and f["rel_l2"] == 0.0


def test_bad_inputs(capsys):
    with pytest.raises(ValueError, match="--policies.*Bogus.*registered"):
        parse_policies("none,Bogus")
    assert parse_policies("DuCa") == ["none", "DuCa"]  # the reference is always run
    for argv, match in ((["--preset", "nope", "--device", "cpu"], "--preset.*nope"),
                        (["--preset", "cpu", "--tiny", "--steps", "3", "--repeat", "0",
                          "--device", "cpu", "--quiet"], "--repeat")):
        assert main(argv) == 2  # one line on stderr, exit code 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(match, err), err
    with pytest.raises(SystemExit, match="allow-cpu"):
        main(["--preset", "opensora-480p-51f", "--device", "cpu"])


@pytest.mark.skipif(not demo_available(), reason="demo config/checkpoint not shipped yet")
def test_demo_preset_decodes_frames(tmp_path):
    torch.set_num_threads(1)
    js = str(tmp_path / "demo.json")
    assert main(["--preset", "demo", "--steps", "4", "--repeat", "1", "--policies",
                    "none,DuCa", "--json", js, "--threads", "1", "--quiet",
                    "--device", "cpu"]) == 0
    rows = {r["policy"]: r for r in json.load(open(js))["results"]}
    assert rows["none"]["psnr_frames"] == 100.0
    assert rows["none"]["ssim_frames"] == pytest.approx(1.0, abs=1e-12)
    assert 0.0 < rows["DuCa"]["ssim_frames"] < 1.0


def test_compile_reports_per_kind_times_and_syncs(tmp_path):
    """--compile (aot_eager here: the inductor regions are tested in test_compile.py): no graph
    compiled in the timed runs, the time per step kind against its FLOPs share, no sync."""
    js = str(tmp_path / "c.json")
    assert main(["--preset", "cpu", "--tiny", "--steps", "6", "--repeat", "1", "--policies",
                 "DuCa", "--compile", "--compile-backend", "aot_eager", "--json", js,
                 "--threads", "1", "--quiet", "--device", "cpu"]) == 0
    with open(js) as f:
        rep = json.load(f)
    assert rep["compile"]["backend"] == "aot_eager" and rep["warmup"] == 1
    assert rep["graphs_compiled_in_timed_runs"] == 0
    rows = {r["policy"]: r for r in rep["results"]}
    none, duca = rows["none"]["step_kinds"], rows["DuCa"]["step_kinds"]
    assert list(none) == ["full"] and none["full"]["steps"] == 6
    assert none["full"]["flops_share"] == 1.0
    assert {k: v["steps"] for k, v in duca.items()} == {
        "full": 3, "full (cross-attn reused)": 1, "conservative": 1, "aggressive": 1}
    assert duca["aggressive"]["flops_share"] == 0.0
    assert 0 < duca["conservative"]["flops_share"] < duca["full (cross-attn reused)"][
        "flops_share"] < 1.0
    for k in duca.values():
        assert k["median_s"] > 0
        assert k["ideal_s"] == pytest.approx(k["flops_share"] * rep["full_step_s"])
    assert rows["none"]["syncs_per_run"] == 0 and rows["DuCa"]["syncs_per_run"] == 0
