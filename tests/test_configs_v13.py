"""configs/opensora-v1-3: upstream's t2v values, a model whose state dict is upstream's 1.3
XL/2 key table, a 1.3 sampler, and the cache configs on top."""
from __future__ import annotations

import os

import pytest
import torch
from mmengine.config import Config
from test_stdit3_v13 import upstream_v13_xl2_keys

from opensora_duca.cache import build_policy
from opensora_duca.registry import MODELS, SCHEDULERS, build_module

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "configs", "opensora-v1-3")


def test_sample_config_is_upstream_t2v():
    cfg = Config.fromfile(os.path.join(ROOT, "inference", "sample.py"))
    assert (cfg.resolution, cfg.aspect_ratio, cfg.num_frames, cfg.fps, cfg.dtype, cfg.seed) == (
        "720p", "9:16", 113, 24, "bf16", 42)
    assert cfg.vae.type == "OpenSoraVAE_V1_3" and cfg.vae.z_channels == 16
    model = {k: v for k, v in cfg.model.items()
             if k not in ("from_pretrained", "force_huggingface")}
    with torch.device("meta"):
        m = MODELS.build(model)
    want = upstream_v13_xl2_keys()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want
    sched = build_module(cfg.scheduler, SCHEDULERS)
    assert (sched.cfg_scale, sched.use_oscillation_guidance, sched.use_flaw_fix,
            sched.transform_version) == (7.5, True, True, "1.3")


@pytest.mark.parametrize("name, policy", [("duca", "DuCa"), ("toca", "ToCa"), ("fora", "FORA"),
                                          ("pab", "PAB")])
def test_cache_configs(name, policy):
    cfg = Config.fromfile(os.path.join(ROOT, "inference", f"{name}.py"))
    assert cfg.num_frames == 113 and cfg.model.kernel_size == (8, 8, -1)
    assert build_policy(cfg.cache).name == policy


def test_plugin_form_for_an_existing_13_run():
    cfg = Config.fromfile(os.path.join(ROOT, "opensora_run", "inference_duca.py"),
                          import_custom_modules=False)
    assert cfg.custom_imports.imports == ["opensora_duca.opensora_plugin"]
    assert cfg.model.type == "DuCa" and cfg.model.cache.type == "DuCa"
    assert cfg.model.model.kernel_size == (8, 8, -1) and cfg.model.model.use_spatial_rope
    assert cfg.scheduler.use_flaw_fix and cfg.scheduler.cfg_scale == 7.5
