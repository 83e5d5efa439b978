"""The Open-Sora 1.3 benchmark preset: its shape and sampler, shrunk to run on a CPU."""
from __future__ import annotations

import json

import pytest
import torch

from opensora_duca.bench.benches import LARGE_PRESETS, PRESETS
from opensora_duca.cli.benchmark import main


def test_preset_is_the_13_default_shape():
    assert "opensora13-720p-113f" in PRESETS
    preset = LARGE_PRESETS["opensora13-720p-113f"][0]
    # 720p 9:16 113 frames through the 1.3 VAE (micro_frame_size 17, temporal overlap):
    # (113 - 1) // 16 * 5 = 35 latent frames, 720 / 8 = 90 rows, 1280 / 8 = 160 columns
    assert preset["latent"] == (16, 35, 90, 160) and preset["video"] == (113, 720, 1280)
    assert preset["model"]["kernel_size"] == (8, 8, -1) and preset["model"]["use_spatial_rope"]
    with pytest.raises(SystemExit, match="720p/113-frame.*allow-cpu"):
        main(["--preset", "opensora13-720p-113f", "--device", "cpu"])


def test_shrunk_13_preset_runs(tmp_path):
    torch.set_num_threads(1)
    js = str(tmp_path / "bench.json")
    assert main(["--preset", "opensora13-720p-113f", "--allow-cpu", "--hidden", "96",
                 "--depth", "1", "--latent", "16", "3", "8", "8", "--steps", "6",
                 "--repeat", "1", "--policies", "none,DuCa", "--json", js, "--quiet",
                 "--threads", "1", "--device", "cpu", "--dtype", "fp32"]) == 0
    with open(js) as f:
        rep = json.load(f)
    assert rep["preset"] == "opensora13-720p-113f"
    rows = {r["policy"]: r for r in rep["results"]}
    assert rows["none"]["psnr"] == 100.0 and rows["DuCa"]["flops_ratio"] > 1.0
