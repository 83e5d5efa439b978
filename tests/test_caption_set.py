"""Caption-set judging of several policies on the same prompts and seeds (tiny random model)."""
from __future__ import annotations

import os

import pytest
from mmengine.config import Config

from opensora_duca.eval.caption_set import evaluate_policies, format_policy_table
from opensora_duca.pipeline import build_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pipe():
    cfg = Config.fromfile(os.path.join(ROOT, "configs/tiny/inference.py"))
    cfg.scheduler.num_sampling_steps = 6
    return build_from_config(cfg, device="cpu")


def test_policies_are_judged_on_the_same_clips(pipe, tmp_path):
    prompts = ["a red circle moving left", "a blue square staying still"]
    res = evaluate_policies(pipe, ["none", dict(type="DuCa", warmup_steps=1)], prompts, [0, 3],
                            batch_size=3, save_dir=str(tmp_path), progress=False)
    none, duca = res["policies"]
    assert res["clips"] == 4 and none["n"] == duca["n"] == 4
    assert none["psnr"] == 100.0 and none["agreement"] == 1.0 and none["flops_ratio"] == 1.0
    assert duca["flops_ratio"] > 1.0 and duca["psnr"] < 100.0
    assert sorted(os.listdir(tmp_path / "DuCa")) == sorted(
        f"{p}-{s}.mp4" for p in prompts for s in (0, 3))
    assert pipe.cache_manager is None and not hasattr(pipe.model, "_duca_cache_manager")
    assert "| DuCa | 4 |" in format_policy_table(res)


def test_reference_policy_must_come_first(pipe):
    with pytest.raises(ValueError, match="first must be 'none'"):
        evaluate_policies(pipe, ["DuCa", "none"], ["a red circle moving left"], [0])
