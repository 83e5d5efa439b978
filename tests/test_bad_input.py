"""Bad input gives clear errors naming the key, the value and what is accepted."""
from __future__ import annotations

import pytest
import torch

from opensora_duca.models.stdit3 import STDiT3
from opensora_duca.pipeline import (
    build_from_config,
    get_image_size,
    get_num_frames,
    load_prompts,
    parse_aspect_ratio,
    resolve_image_size,
)
from opensora_duca.registry import MODELS, SCHEDULERS, VAES, build_module
from opensora_duca.utils.dtype import resolve_dtype


def small_model(**kw):
    torch.manual_seed(0)
    return STDiT3(in_channels=4, hidden_size=32, depth=1, num_heads=2, caption_channels=8,
                  model_max_length=5, **kw).eval()


def tiny_cfg(**over):
    cfg = dict(image_size=(16, 16), num_frames=2, fps=8, seed=0, dtype="fp32",
               model=dict(type="STDiT3-S/2", depth=1, hidden_size=32, num_heads=2),
               vae=dict(type="DemoCodec"),
               text_encoder=dict(type="DemoTextEncoder", output_dim=8, model_max_length=6),
               scheduler=dict(type="rflow", num_sampling_steps=2))
    cfg.update(over)
    return cfg


def test_unknown_registry_type_lists_registered():
    with pytest.raises(KeyError, match=r"unknown model type 'STDiT9'.*STDiT3-XL/2"):
        build_module(dict(type="STDiT9"), MODELS)
    with pytest.raises(KeyError, match=r"'nope'.*rflow"):
        build_module(dict(type="nope"), SCHEDULERS)
    with pytest.raises(KeyError, match=r"no 'type' key.*DemoCodec"):
        build_module(dict(factor=2), VAES)
    with pytest.raises(KeyError, match=r"'NoVAE'.*identity"):
        build_from_config(tiny_cfg(vae=dict(type="NoVAE")), device="cpu")


def test_wrong_latent_channels():
    model = small_model()
    with pytest.raises(ValueError, match=r"in_channels=4.*\(1, 3, 2, 4, 4\)"):
        model(torch.zeros(1, 3, 2, 4, 4), torch.zeros(1), torch.zeros(1, 1, 5, 8))


def test_mismatched_shapes():
    model = small_model()
    x, t, y = torch.zeros(2, 4, 2, 4, 4), torch.zeros(2), torch.zeros(2, 1, 5, 8)
    with pytest.raises(ValueError, match=r"mask: expected \[B or B/k, L=5\].*\(2, 4\)"):
        model(x, t, y, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"mask.*\(3, 5\)"):
        model(x, t, y, mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"x_mask: expected \[B=2, T=2\].*\(2, 3\)"):
        model(x, t, y, x_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"y: expected caption embedding \[2, 1, L, 8\]"):
        model(x, t, torch.zeros(2, 1, 5, 7))
    with pytest.raises(ValueError, match=r"timestep: expected 2 values"):
        model(x, torch.zeros(3), y)
    with pytest.raises(TypeError, match="unexpected arguments"):
        model(x, t, y, bogus=1)


def test_missing_checkpoint_path(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*does not exist"):
        build_module(dict(type="STDiT3-S/2", depth=1, from_pretrained=missing), MODELS)
    with pytest.raises(FileNotFoundError, match="holds none of"):
        build_module(dict(type="STDiT3-S/2", depth=1, from_pretrained=str(tmp_path)), MODELS)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_from_config(tiny_cfg(), device="cpu", ckpt_path=missing)


def test_bad_rflow_settings():
    with pytest.raises(ValueError, match=r"num_sampling_steps=0.*integer >= 1"):
        build_module(dict(type="rflow", num_sampling_steps=0), SCHEDULERS)
    with pytest.raises(ValueError, match=r"num_sampling_steps=2.5"):
        build_module(dict(type="rflow", num_sampling_steps=2.5), SCHEDULERS)
    with pytest.raises(ValueError, match=r"sample_method='bogus'.*logit-normal"):
        build_module(dict(type="rflow", sample_method="bogus"), SCHEDULERS)


def test_bad_model_settings():
    with pytest.raises(ValueError, match=r"hidden_size=30 is not divisible by num_heads=4"):
        STDiT3(hidden_size=30, num_heads=4, depth=1)
    with pytest.raises(ValueError, match=r"depth=0"):
        STDiT3(depth=0)


def test_bad_video_settings(tmp_path):
    with pytest.raises(ValueError, match=r"resolution='999p'.*480p"):
        get_image_size("999p", "9:16")
    with pytest.raises(ValueError, match=r"aspect_ratio='wide'.*9:16"):
        parse_aspect_ratio("wide")
    with pytest.raises(ValueError, match=r"num_frames='3z'.*2s"):
        get_num_frames("3z")
    with pytest.raises(ValueError, match=r"num_frames=0"):
        get_num_frames(0)
    with pytest.raises(ValueError, match=r"image_size=\(16,\).*\(H, W\)"):
        resolve_image_size((16,))
    with pytest.raises(ValueError, match=r"give image_size"):
        resolve_image_size(None, None)
    with pytest.raises(ValueError, match=r"dtype='fp8'.*bf16"):
        resolve_dtype("fp8")
    with pytest.raises(FileNotFoundError, match=r"prompt_path="):
        load_prompts(str(tmp_path / "none.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(str(empty))


def test_bad_pipeline_config():
    with pytest.raises(KeyError, match=r"config key 'scheduler' is missing"):
        cfg = tiny_cfg()
        del cfg["scheduler"]
        build_from_config(cfg, device="cpu")
    with pytest.raises(ValueError, match=r"config key 'cache'=.*dict\(type="):
        build_from_config(tiny_cfg(cache=dict(policy="DuCa")), device="cpu")
    pipe = build_from_config(tiny_cfg(), device="cpu")
    with pytest.raises(ValueError, match=r"prompts=.*list of strings"):
        pipe.generate([])
    with pytest.raises(ValueError, match=r"seeds has 1 values for 2 prompts"):
        pipe.generate(["a red circle moving left"] * 2, seeds=[1])
    with pytest.raises(ValueError, match=r"fps=-1"):
        pipe.generate(["a red circle moving left"], fps=-1)
    with pytest.raises(ValueError, match=r"DemoCodec: H=15"):
        pipe.generate(["a red circle moving left"], height=15, width=16)
