"""The shipped demo checkpoint loads through the demo config and generates videos that the
caption judge accepts, uncached and with DuCa: one prompt per direction (and a still one), in
different colours and shapes, with a fixed seed. The prompts were not picked by looking at the
results; the full held-out accuracy is measured by ``tools/judge.py`` (README "Measured")."""
from __future__ import annotations

import os

import pytest
import torch
from mmengine.config import Config

from opensora_duca.cache import apply_cache, remove_cache
from opensora_duca.eval.judge import judge
from opensora_duca.pipeline import build_from_config
from opensora_duca.utils.video import to_uint8_frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "opensora_duca/assets/demo_stdit3.safetensors")
PROMPTS = ["a yellow circle moving down", "a green circle moving left", "a red square moving up",
           "a blue triangle moving right", "a white square staying still"]


@pytest.mark.skipif(not os.path.isfile(CKPT), reason="demo checkpoint not shipped")
def test_shipped_checkpoint_generates_judged_videos():
    assert os.path.getsize(CKPT) <= 20 * 2 ** 20
    cfg = Config.fromfile(os.path.join(ROOT, "configs/demo/inference.py"))
    cfg.cache = None
    pipe = build_from_config(cfg, device="cpu")
    out = pipe.generate(PROMPTS, seeds=[0] * len(PROMPTS))
    for prompt, video in zip(PROMPTS, out["video"]):
        v = judge(to_uint8_frames(video), prompt)
        assert v["ok"], (prompt, v["detected_color"], v["detected_direction"])
    pipe.cache_manager = apply_cache(pipe.model, dict(type="DuCa"))
    cached = pipe.generate(PROMPTS, seeds=[0] * len(PROMPTS))
    remove_cache(pipe.model)
    for prompt, video in zip(PROMPTS, cached["video"]):
        assert judge(to_uint8_frames(video), prompt)["ok"], prompt
    assert not torch.equal(cached["video"], out["video"])
