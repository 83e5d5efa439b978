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
    reference_condition,
    resolve_image_size,
    unique_filenames,
)

PROMPTS = ["a red circle moving left", "a blue square staying still", "a green triangle moving up"]


def tiny_cfg(**over):
    cfg = dict(image_size=(16, 16), num_frames=3, fps=8, seed=7, dtype="fp32", batch_size=2,
               model=dict(type="STDiT3-S/2", depth=1, hidden_size=32, num_heads=2),
               vae=dict(type="DemoCodec"),
               text_encoder=dict(type="DemoTextEncoder", output_dim=8, model_max_length=6),
               # 3 frames: the 1.2 transform's frame factor 3 // 17 * 5 is 0; counted as 1
               scheduler=dict(type="rflow", num_sampling_steps=3, cfg_scale=4.0,
                              use_timestep_transform=True, scale_temporal=False))
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
    assert set(out["timings"]) == {"text_s", "encode_s", "sample_s", "decode_s", "total_s"}
    assert out["timings"]["encode_s"] == 0.0 and out["mask_index"] is None  # no reference


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


# ------------------------------------------------- Open-Sora 1.3 i2v / v2v conditioning
def tiny13_cfg(**over):
    cfg = tiny_cfg(model=dict(type="STDiT3-S/2", depth=1, hidden_size=48, num_heads=2,
                              cond_embedders=True, kernel_size=(2, 2, -1),
                              use_spatial_rope=True), **over)
    return cfg


@pytest.fixture(scope="module")
def pipe13():
    torch.set_num_threads(1)
    return build_from_config(tiny13_cfg(), device="cpu")


def _video(frames, seed, size=(16, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, frames, *size, generator=g) * 2 - 1


def _record(pipe):
    """The keyword arguments of every model call (a forward pre-hook)."""
    calls = []
    handle = pipe.model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((args, dict(kwargs))), with_kwargs=True)
    return calls, handle


def test_reference_condition_by_cond_type():
    c, t, h, w = 2, 4, 1, 1
    ref = torch.arange(c * 3 * h * w, dtype=torch.float32).view(c, 3, h, w) + 1  # 3 frames
    img = torch.full((c, 1, h, w), -7.0)
    shape = (2, c, t, h, w)
    z, idx = reference_condition("i2v_head", [[ref], [img]], shape)
    assert idx == [0]
    assert torch.equal(z[0, :, 0], ref[:, 0]) and torch.equal(z[1, :, 0], img[:, 0])
    assert z[:, :, 1:].abs().sum() == 0
    z, idx = reference_condition("i2v_tail", [[ref], [img]], shape)
    assert idx == [3] and torch.equal(z[0, :, 3], ref[:, -1]) and z[:, :, :3].abs().sum() == 0
    # i2v_loop: first frame from the first reference; last frame from the second reference's
    # first frame when there are two, else from the first reference's last frame
    z, idx = reference_condition("i2v_loop", [[ref], [ref, img]], shape)
    assert idx == [0, 3]
    assert torch.equal(z[0, :, 3], ref[:, -1]) and torch.equal(z[1, :, 3], img[:, 0])
    assert torch.equal(z[1, :, 0], ref[:, 0]) and z[:, :, 1:3].abs().sum() == 0
    # v2v_head: the first min(condition_frame_length, T, shortest reference) frames
    z, idx = reference_condition("v2v_head", [[ref], [ref]], shape, condition_frame_length=2)
    assert idx == [0, 1] and torch.equal(z[0, :, :2], ref[:, :2]) and z[:, :, 2:].sum() == 0
    assert reference_condition("v2v_head", [[ref], [ref]], shape, 5)[1] == [0, 1, 2]
    assert reference_condition("v2v_head", [[ref], [img]], shape, 5)[1] == [0]
    with pytest.raises(ValueError, match="cond_type='i2v_flip' is not accepted"):
        reference_condition("i2v_flip", [[ref], [img]], shape)
    with pytest.raises(ValueError, match="at least 2 latent frames"):
        reference_condition("i2v_loop", [[ref]], (1, c, 1, h, w))
    with pytest.raises(ValueError, match=r"references\[1\]: latent \(2, 1, 2, 1\)"):
        reference_condition("i2v_head", [[ref], [torch.zeros(c, 1, 2, 1)]], shape)


def test_i2v_run_passes_the_reference_and_the_three_way_batch(pipe13):
    refs = [_video(1, 1), _video(1, 2)]
    calls, handle = _record(pipe13)
    try:
        out = pipe13.generate(PROMPTS[:2], references=refs, cond_type="i2v_head",
                              image_cfg_scale=3.0, use_sdedit=True)
    finally:
        handle.remove()
    assert out["mask_index"] == [0] and out["latents"].shape == (2, 12, 3, 8, 8)
    assert torch.isfinite(out["latents"]).all() and out["timings"]["encode_s"] > 0
    assert len(calls) == 3  # one model call per step
    (z_in, t_in, y_in), kw = calls[0]
    assert z_in.shape[0] == 6 and kw["mask_index"] == [0]
    lat = pipe13.vae.encode(torch.stack(refs))  # [2, 12, 1, 8, 8]
    given = torch.zeros(2, 12, 3, 8, 8)
    given[:, :, :1] = lat
    assert torch.equal(kw["cond"], torch.cat([given, given, torch.zeros_like(given)]))
    m = torch.zeros_like(given)
    m[:, :, 0] = 1
    assert torch.equal(kw["cond_mask"], torch.cat([m, m, m]))
    y_null = pipe13.text_encoder.null(2)
    assert torch.equal(kw["y_null"], torch.cat([y_null] * 3))
    assert torch.equal(y_in[2:], torch.cat([y_null, y_null]))
    # SDEdit at t = 1000: the given frame of every third is the prompt's own fresh noise, not
    # the initial noise (its generator continues after drawing it)
    z0 = pipe13.initial_noise([7, 8], [3, 8, 8])
    assert torch.equal(z_in[:2, :, 1:], z0[:, :, 1:])
    assert not torch.allclose(z_in[:2, :, 0], z0[:, :, 0])


def test_i2v_sdedit_clip_does_not_depend_on_its_batch(pipe13):
    refs = [_video(1, 1), _video(1, 2), _video(1, 3)]
    kw = dict(references=refs, cond_type="i2v_tail", use_sdedit=True)
    a = pipe13.generate(PROMPTS, batch_size=3, **kw)
    b = pipe13.generate(PROMPTS, batch_size=1, **kw)
    assert a["mask_index"] == [2]
    assert torch.allclose(a["latents"], b["latents"], atol=1e-5)
    # and without a reference the run is the text-to-video one
    c = pipe13.generate(PROMPTS[:1])
    d = pipe13.generate(PROMPTS[:1], references=refs[:1], cond_type="i2v_tail")
    assert c["mask_index"] is None and not torch.allclose(c["latents"], d["latents"])


def test_v2v_length_is_one_for_the_whole_call(pipe13):
    long, short = _video(3, 4), _video(2, 5)
    out = pipe13.generate(PROMPTS[:2], references=[long, [long]], cond_type="v2v_head",
                          condition_frame_length=5, batch_size=1)
    assert out["mask_index"] == [0, 1, 2]
    out = pipe13.generate(PROMPTS[:2], references=[long, short], cond_type="v2v_head",
                          batch_size=1)  # the shortest reference of the call: 2 frames
    assert out["mask_index"] == [0, 1]


def test_config_conditioning_keys_are_defaults(monkeypatch):
    p = build_from_config(tiny13_cfg(cond_type="i2v_head", image_cfg_scale=5.0,
                                     use_oscillation_guidance_for_text=True), device="cpu")
    seen = []
    real = p.scheduler.sample
    monkeypatch.setattr(p.scheduler, "sample", lambda *a, **k: seen.append(k) or real(*a, **k))
    p.generate(PROMPTS[:1], references=[_video(1, 1)])
    k = seen[-1]
    assert k["image_cfg_scale"] == 5.0 and k["use_sdedit"] is False and k["mask_index"] == [0]
    assert k["use_oscillation_guidance_for_text"] is True
    assert k["use_oscillation_guidance_for_image"] is None
    p.generate(PROMPTS[:1], references=[_video(1, 1)], image_cfg_scale=2.0, use_sdedit=True)
    assert seen[-1]["image_cfg_scale"] == 2.0 and seen[-1]["use_sdedit"] is True
    # upstream's default image scale without a config value: 7.5; "none": text to video
    q = build_from_config(tiny13_cfg(), device="cpu")
    monkeypatch.setattr(q.scheduler, "sample", lambda *a, **k: seen.append(k) or real(*a, **k))
    q.generate(PROMPTS[:1], references=[_video(1, 1)], cond_type="i2v_head")
    assert seen[-1]["image_cfg_scale"] == 7.5
    p.generate(PROMPTS[:1], cond_type="none")
    assert "mask_index" not in seen[-1]


def test_i2v_under_cache_none_is_exact_and_duca_runs(pipe13):
    kw = dict(references=[_video(1, 1)], cond_type="i2v_head", use_sdedit=True)
    base = pipe13.generate(PROMPTS[:1], **kw)
    p = build_from_config(tiny13_cfg(cache=dict(type="none")), device="cpu")
    assert torch.equal(p.generate(PROMPTS[:1], **kw)["latents"], base["latents"])
    cfg = tiny13_cfg(cache=dict(type="DuCa"))
    cfg["scheduler"]["num_sampling_steps"] = 6
    d = build_from_config(cfg, device="cpu")
    out = d.generate(PROMPTS[:1], **kw)
    assert torch.isfinite(out["latents"]).all() and d.cache_manager.stats()["steps"] == 6


@pytest.mark.parametrize("kw, match", [
    (dict(references=[_video(1, 1)]), "references given without cond_type"),
    (dict(cond_type="i2v_head"), r"cond_type='i2v_head' needs references, one per prompt"),
    (dict(cond_type="i2v_head", references=[_video(1, 1), _video(1, 1)]),
     "needs references, one per prompt; got 2 for 1"),
    (dict(cond_type="i2v_head", references=[_video(1, 1, size=(8, 8))]),
     r"references\[0\]=\[\(3, 1, 8, 8\)\] is not accepted; accepted: a pixel video "
     r"\[3, F, 16, 16\]"),
    (dict(cond_type="v2v", references=[_video(1, 1)]), "cond_type='v2v' is not accepted"),
    (dict(cond_type="i2v_head", references=[_video(1, 1)], image_cfg_scale=float("inf")),
     "image_cfg_scale=inf is not accepted"),
    (dict(cond_type="i2v_head", references=[_video(1, 1)], use_sdedit=1), "use_sdedit=1"),
    (dict(cond_type="v2v_head", references=[_video(1, 1)], condition_frame_length=0),
     "condition_frame_length=0 is not accepted"),
    (dict(use_oscillation_guidance_for_image="on"), "use_oscillation_guidance_for_image='on'"),
])
def test_bad_conditioning_fails_before_any_work(pipe13, kw, match, monkeypatch):
    def no_text(*a, **k):
        raise AssertionError("the text encoder ran before the settings were checked")

    monkeypatch.setattr(pipe13.text_encoder, "encode", no_text)
    with pytest.raises(ValueError, match=match):
        pipe13.generate(PROMPTS[:1], **kw)


def test_i2v_refusals(pipe, pipe13, monkeypatch):
    kw = dict(references=[_video(1, 1)], cond_type="i2v_head")
    with pytest.raises(ValueError, match="needs a model with the 1.3 reference embedders"):
        pipe.generate(PROMPTS[:1], **kw)
    monkeypatch.setattr(pipe13, "cfg_parallel", object())
    with pytest.raises(ValueError, match="not accepted with cfg_parallel=2"):
        pipe13.generate(PROMPTS[:1], **kw)
    shared = build_from_config(tiny13_cfg(cache=dict(type="DuCa", cfg_shared_selection=True)),
                               device="cpu")
    with pytest.raises(ValueError, match="cfg_shared_selection=True is not accepted with "
                                         "cond_type='i2v_head'"):
        shared.generate(PROMPTS[:1], **kw)


def test_degenerate_frame_count_fails_before_any_work(monkeypatch):
    cfg = tiny_cfg()
    cfg["scheduler"] = dict(cfg["scheduler"], scale_temporal=True)
    p = build_from_config(cfg, device="cpu")

    def no_text(*a, **k):
        raise AssertionError("the text encoder ran before the frame count was checked")

    monkeypatch.setattr(p.text_encoder, "encode", no_text)
    with pytest.raises(ValueError, match="num_frames=3 is not accepted with "
                                         "use_timestep_transform"):
        p.generate(PROMPTS[:1])
    assert p.scheduler.num_sampling_steps == 3
