"""tools/frontier.py --quick writes its JSON and PNG, resumes without recomputing, and rejects
bad arguments with one line and exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "opensora_duca/assets/demo_stdit3.safetensors")


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "tools/frontier.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.skipif(not os.path.isfile(CKPT), reason="demo checkpoint not shipped")
def test_quick_frontier_writes_json_and_png_and_resumes(tmp_path):
    out = tmp_path / "f.json"
    args = ["--quick", "--families", "DuCa,FORA+forecast,TeaCache", "--out", str(out),
            "--threads", "1", "--batch-size", "2"]
    r = _run(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert (tmp_path / "f.png").stat().st_size > 1000
    fams = [p["family"] for p in data["points"]]
    assert fams == ["DuCa", "FORA+forecast", "TeaCache"]  # one point per family in --quick
    for p in data["points"]:
        assert p["flops_ratio"] >= 1.0 and 0.0 <= p["agreement"] <= 1.0
        # 3 clips in batches of 2 and 1: the counts are those of both batches
        assert sum(p["steps_by_kind"].values()) == 2 * 10, p
        assert 0.0 < p["ssim"] <= 1.0 and p["psnr"] > 10
    assert data["meta"]["steps"] == 10 and len(data["meta"]["prompts"]) == 3
    before = out.read_text()
    r2 = _run(*args)  # resumes: nothing left to compute, same results
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert json.loads(out.read_text())["points"] == json.loads(before)["points"]
    assert "DuCa:" not in r2.stderr  # no progress bar of a recomputed point


@pytest.mark.parametrize("args, match", [
    (["--families", "Nope"], "--families 'Nope'"),
    (["--steps", "1"], "--steps 1"),
    (["--num-prompts", "0"], "n=0"),
    (["--calibration", "/no/such.json"], "--calibration"),
])
def test_bad_arguments_are_one_line_exit_2(args, match):
    r = _run(*args, "--out", "/tmp/never-written.json", timeout=120)
    assert r.returncode == 2 and match in r.stderr and r.stderr.count("\n") == 1, r.stderr
