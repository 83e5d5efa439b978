"""opensora_duca.pipeline: sizes, prompts, seeding and the cache hook-up."""
from __future__ import annotations

import hashlib

import pytest
import torch

from opensora_duca.pipeline import (
    append_scores,
    build_from_config,
    get_image_size,
    get_num_frames,
    load_prompts,
    prompt_to_filename,
    resolve_image_size,
    unique_filenames,
)

PROMPTS = ["a red circle moving left", "a blue square staying still", "a green triangle moving up"]


def tiny_cfg(**over):
    cfg = dict(image_size=(16, 16), num_frames=3, fps=8, seed=7, dtype="fp32", batch_size=2,
               model=dict(type="STDiT3-S/2", depth=1, hidden_size=32, num_heads=2),
               vae=dict(type="DemoCodec"),
               text_encoder=dict(type="DemoTextEncoder", output_dim=8, model_max_length=6),
               scheduler=dict(type="rflow", num_sampling_steps=3, cfg_scale=4.0,
                              use_timestep_transform=True))
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return build_from_config(tiny_cfg(), device="cpu")


def test_open_sora_sizes():
    assert get_image_size("480p", "9:16") == (480, 854)
    assert get_image_size("240p", "9:16") == (240, 426)
    assert get_image_size("240p", "1:1") == (320, 320)
    assert get_image_size("720p", "16:9") == (1280, 720)
    assert get_image_size("144p", "9:16") == (144, 256)
    assert resolve_image_size((40, 24), "480p", "9:16") == (40, 24)  # image_size wins
    assert resolve_image_size(None, "360p") == (360, 640)
    assert get_num_frames("2s") == 51 and get_num_frames("4x") == 204 and get_num_frames(8) == 8
    assert get_num_frames("16") == 16


def test_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\n  second one  \nthird\n")
    assert load_prompts(str(f)) == ["first prompt", "second one", "third"]
    assert load_prompts(str(f), 1, 2) == ["second one"]
    assert append_scores(["a cat"], aes=6.5) == ["a cat aesthetic score: 6.5."]
    assert append_scores(["a cat"], aes=6.5, flow=4) == [
        "a cat aesthetic score: 6.5. motion score: 4.0."]
    assert append_scores(["x"]) == ["x"]
    assert prompt_to_filename("A cat, on/the mat!") == "A_cat_onthe_mat"


def test_unique_filenames():
    def h(p):
        return hashlib.sha1(p.encode()).hexdigest()[:8]

    long_a, long_b = "x" * 100 + " a", "x" * 100 + " b"  # equal in their first 100 characters
    prompts = ["a cat!", "a cat?", "a dog", "a dog", long_a, long_b, "a bird"]
    assert unique_filenames(prompts) == [
        f"a_cat-{h('a cat!')}", f"a_cat-{h('a cat?')}", "a_dog-2", "a_dog-3",
        "x" * 100 + f"-{h(long_a)}", "x" * 100 + f"-{h(long_b)}", "a_bird"]
    assert unique_filenames(["a cat", "a dog"]) == ["a_cat", "a_dog"]  # no clash: as before


def test_generate_shapes_and_defaults(pipe):
    out = pipe.generate(PROMPTS[:2])
    assert out["video"].shape == (2, 3, 3, 16, 16) and out["video"].dtype == torch.float32
    assert out["video"].abs().max() <= 1.0
    assert out["latents"].shape == (2, 12, 3, 8, 8)
    assert out["seeds"] == [7, 8] and out["image_size"] == (16, 16) and out["fps"] == 8
    assert set(out["timings"]) == {"text_s", "sample_s", "decode_s", "total_s"}


def test_noise_is_per_prompt_and_batch_independent(pipe):
    a = pipe.generate(PROMPTS, batch_size=3)
    b = pipe.generate(PROMPTS, batch_size=1)
    assert torch.allclose(a["latents"], b["latents"], atol=1e-5)
    c = pipe.generate(PROMPTS[2:], seeds=[9])
    assert torch.allclose(c["latents"][0], a["latents"][2], atol=1e-5)
    z = pipe.initial_noise([9], [3, 8, 8])
    g = torch.Generator().manual_seed(9)
    assert torch.equal(z[0], torch.randn(12, 3, 8, 8, generator=g))
    d = pipe.generate(PROMPTS[:1], seed=123)
    assert not torch.allclose(d["latents"][0], a["latents"][0])


def test_overrides_restore_scheduler(pipe):
    out = pipe.generate(PROMPTS[:1], num_sampling_steps=1, cfg_scale=1.0, num_frames=2,
                        height=8, width=24)
    assert out["video"].shape == (1, 3, 2, 8, 24)
    assert pipe.scheduler.num_sampling_steps == 3 and pipe.scheduler.cfg_scale == 4.0


def test_build_wiring():
    p = build_from_config(tiny_cfg(), device="cpu")
    assert p.model.in_channels == p.vae.out_channels == 12
    assert p.model.caption_channels == 8 and p.model.model_max_length == 6
    assert p.text_encoder.y_embedder is p.model.y_embedder
    assert not p.model.enable_sequence_parallelism
    q = build_from_config(tiny_cfg(), device="cpu", enable_sequence_parallelism=True)
    assert q.model.enable_sequence_parallelism
    for k, v in p.model.state_dict().items():  # same seed -> same random weights
        assert torch.equal(v, q.model.state_dict()[k]), k


def test_cache_none_is_exact_and_duca_reports(pipe):
    base = pipe.generate(PROMPTS[:2], num_sampling_steps=3)
    p = build_from_config(tiny_cfg(cache=dict(type="none")), device="cpu")
    out = p.generate(PROMPTS[:2], num_sampling_steps=3)
    assert torch.equal(out["latents"], base["latents"])
    assert "cache policy" in p.report()
    cfg = tiny_cfg(cache=dict(type="DuCa"))
    cfg["scheduler"]["num_sampling_steps"] = 10
    d = build_from_config(cfg, device="cpu")
    d.generate(PROMPTS[:1])
    stats = d.cache_manager.stats()
    assert stats["steps"] == 10 and "DuCa" in d.report()
    assert pipe.report() is None


def test_configs_parse():
    import os

    from mmengine.config import Config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = Config.fromfile(os.path.join(root, "configs/opensora-v1-2/inference/sample.py"))
    assert cfg.model.type == "STDiT3-XL/2" and cfg.model.from_pretrained
    assert cfg.vae.type == "OpenSoraVAE_V1_2" and cfg.text_encoder.type == "t5"
    assert cfg.text_encoder.model_max_length == 300
    assert (cfg.scheduler.type, cfg.scheduler.num_sampling_steps, cfg.scheduler.cfg_scale) == (
        "rflow", 30, 7.0)
    assert (cfg.resolution, cfg.aspect_ratio, cfg.num_frames, cfg.fps, cfg.dtype, cfg.seed) == (
        "480p", "9:16", 51, 24, "bf16", 42)
    assert resolve_image_size(cfg.get("image_size"), cfg.resolution, cfg.aspect_ratio) == (
        480, 854)
    tiny = Config.fromfile(os.path.join(root, "configs/tiny/inference.py"))
    assert tuple(tiny.image_size) == (32, 32) and tiny.num_frames == 8
