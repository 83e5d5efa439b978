"""tools/benchmark.py's Open-Sora 2.0 presets: the CPU-sized MMDiT runs end to end with every
policy's FLOPs ratio and fidelity reported; the published sizes print their analytic TFLOP per
step (checked by hand from the convention) and refuse a CPU in one line."""
from __future__ import annotations

import pytest

from opensora_duca.bench.mmdit import V2_PRESETS, preset_grid, run_v2_benchmark, step_tflops
from opensora_duca.cli import benchmark


def test_mmdit_cpu_preset_reports_each_policy():
    report = run_v2_benchmark("mmdit-cpu", [dict(type="DuCa"), dict(type="TeaCache")],
                              __import__("torch").device("cpu"),
                              __import__("torch").float32, repeat=1, steps=6, log=lambda s: None)
    rows = {r["policy"]["type"]: r for r in report["rows"]}
    assert rows["none"]["flops_ratio"] == 1.0 and rows["none"]["psnr"] == float("inf")
    assert rows["DuCa"]["flops_ratio"] > 1.2 and 20 < rows["DuCa"]["psnr"] < float("inf")
    assert report["tokens"] == 4 * 16 * 16


def test_published_step_tflops_by_hand():
    """256px 16:9, 129 frames: 33 latent frames of 12 x 21 tokens, 512 text tokens, 3 branches;
    per double block 2 (N+L) C (3C) + 4 (N+L)^2 C + 2 (N+L) C^2 + 4 (N+L) C F, per single block
    2 (N+L) C (3C + F) + 4 (N+L)^2 C + 2 (N+L) (C + F) C."""
    assert preset_grid(V2_PRESETS["opensora2-256px"]) == (33, 12, 21)
    n, L, C, F = 33 * 12 * 21, 512, 3072, 4 * 3072
    s = n + L
    double = 2 * s * C * 3 * C + 4 * s * s * C + 2 * s * C * C + 4 * s * C * F
    single = 2 * s * C * (3 * C + F) + 4 * s * s * C + 2 * s * (C + F) * C
    assert step_tflops(V2_PRESETS["opensora2-256px"]) == pytest.approx(
        3 * (19 * double + 38 * single) / 1e12, rel=1e-12)


def test_published_preset_refuses_a_cpu(capsys):
    assert benchmark.main(["--preset", "opensora2-768px", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "TFLOP" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "--preset='opensora2-768px' is not accepted; accepted: a GPU " \
        "device" in err[0], err
