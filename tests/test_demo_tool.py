"""tools/demo.py (the main job) on one process: every configured policy runs and is reported
against the uncached run; configuration mistakes are one line and exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "opensora_duca/assets/demo_stdit3.safetensors")


def _demo(*args):
    return subprocess.run([sys.executable, "tools/demo.py", "configs/demo/inference.py", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.skipif(not os.path.isfile(CKPT), reason="demo checkpoint not shipped")
def test_demo_runs_every_policy_and_reports_it(tmp_path):
    r = _demo("--prompt", "a red circle moving left", "a blue square staying still",
              "--num-sampling-steps", "8", "--save-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    runs = [row["run"] for row in summary["runs"]]
    assert runs == ["uncached", "DuCa", "FORA+forecast"]
    for row in summary["runs"]:
        assert len(row["files"]) == 2 and all(os.path.isfile(f) for f in row["files"])
    uncached, duca, fora = summary["runs"]
    assert uncached["psnr"] == 100.0 and uncached["flops_ratio"] == 1.0
    assert duca["flops_ratio"] > 1.5 and fora["flops_ratio"] > 1.5  # 8 steps: shorter plans
    assert 20 < duca["psnr"] < 100 and 20 < fora["psnr"] < 100
    assert "| FORA+forecast |" in r.stdout and "[FORA+forecast]" in r.stdout


@pytest.mark.parametrize("opt, match", [
    ("compare_caches.x.type=Nope", "unknown cache policy type 'Nope'"),
    ("compare_caches.x.type=FORA compare_caches.x.interval=0", "interval=0"),
    ("compare_caches.uncached.type=FORA", "run name 'uncached'"),
    ("cache=None", "no `cache"),
])
def test_demo_config_mistakes_exit_2(tmp_path, capsys, opt, match):
    from opensora_duca.cli import demo

    code = demo.main(["configs/demo/inference.py", "--save-dir", str(tmp_path),
                      "--cfg-options", *opt.split()])
    err = capsys.readouterr().err
    assert code == 2 and match in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())  # nothing built, nothing written
