"""The shipped demo checkpoint loads through the demo config and generates videos that the
caption judge accepts, uncached and with DuCa.

The prompts follow a rule fixed before any output was looked at: every direction x every shape
(15 prompts), the k-th of them (shape-major, in ``SHAPES`` x ``DIRECTIONS`` order) in colour
``COLORS[k mod 7]``, all with noise seed 0. The bound comes from the caption-set measurement
(docs/results/frontier.json: 105 captions x seeds 0 and 1, the same weights, which include these
15 prompts): there every clip was judged right in everything (``all_ok``: colour, shape, motion,
one object; 210/210 uncached and with DuCa), still captions included since the checkpoint was
retrained with still shapes in the centre. So: at least 14 of the 15 prompts ``all_ok`` (one
allowed to flip on another platform's float rounding), uncached and with DuCa."""
from __future__ import annotations

import os

import pytest
import torch
from mmengine.config import Config

from opensora_duca.cache import apply_cache, remove_cache
from opensora_duca.data.synthetic import COLORS, DIRECTIONS, SHAPES, caption_for
from opensora_duca.eval.judge import judge
from opensora_duca.pipeline import build_from_config
from opensora_duca.utils.video import to_uint8_frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "opensora_duca/assets/demo_stdit3.safetensors")
PROMPTS = [caption_for(list(COLORS)[k % len(COLORS)], shape, direction)
           for k, (shape, direction) in enumerate((s, d) for s in SHAPES for d in DIRECTIONS)]
MIN_ALL = 14  # all_ok of the 15 prompts


@pytest.mark.skipif(not os.path.isfile(CKPT), reason="demo checkpoint not shipped")
def test_shipped_checkpoint_generates_judged_videos():
    assert os.path.getsize(CKPT) <= 20 * 2 ** 20
    assert len(set(PROMPTS)) == 15
    torch.set_num_threads(2)
    cfg = Config.fromfile(os.path.join(ROOT, "configs/demo/inference.py"))
    cfg.cache = None
    pipe = build_from_config(cfg, device="cpu")
    gen = dict(seeds=[0] * len(PROMPTS), batch_size=len(PROMPTS))
    out = pipe.generate(PROMPTS, **gen)
    pipe.cache_manager = apply_cache(pipe.model, dict(type="DuCa"))
    cached = pipe.generate(PROMPTS, **gen)
    remove_cache(pipe.model)
    pipe.cache_manager = None
    assert not torch.equal(cached["video"], out["video"])
    for name, videos in (("uncached", out["video"]), ("DuCa", cached["video"])):
        verdicts = [judge(to_uint8_frames(v), p) for p, v in zip(PROMPTS, videos)]
        wrong = [(v["caption"], v["reason"]) for v in verdicts if not v["all_ok"]]
        assert sum(v["expected_direction"] == "still" for v in verdicts) == 3
        assert len(PROMPTS) - len(wrong) >= MIN_ALL, (name, wrong)
