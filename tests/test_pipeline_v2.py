"""Open-Sora 2.0 runs: the tiny config end to end through tools/inference.py, the pipeline's
conditioned runs and cache, upstream's size table and prompt text by hand, the shipped
configs, and the config checks (one line, exit 2, before anything is built)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine import Config

from opensora_duca.cli.inference import main as inference_main
from opensora_duca.config_check import check_v2_inference_config
from opensora_duca.models.codecs import TinyCausalCodec
from opensora_duca.models.text_encoders import HashedTextEmbedder, HFTextEmbedder
from opensora_duca.pipeline_v2 import (
    build_v2_from_config,
    image_size_v2,
    is_v2_config,
    load_reference,
    prompt_text,
    sampling_settings,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "opensora-v2", "inference")
TINY = os.path.join(CONFIGS, "tiny.py")


def _tiny(**overrides):
    cfg = Config.fromfile(TINY)
    cfg.merge_from_dict(overrides)
    return cfg


@pytest.fixture(scope="module")
def pipe():
    return build_v2_from_config(_tiny(), device="cpu")


# ------------------------------------------------------------------ the tool, end to end
FLAGS = ["--save-latents", "--no-progress", "--prompt", "a red circle moving left",
         "a blue square", "--num-sampling-steps", "4", "--cfg-scale", "5", "--seed", "7"]


def _tool(args, torchrun=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "inference.py")]
    if torchrun:
        from dist_utils import free_port
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(torchrun), "--master_port", str(free_port())] + cmd[1:]
    res = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory):
    """One run of the tool's main in this process (the 2-rank test runs tools/inference.py)."""
    import contextlib
    import io
    save = tmp_path_factory.mktemp("v2tool")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = inference_main([TINY, "--save-dir", str(save), "--device", "cpu"] + FLAGS)
    assert rc == 0, out.getvalue()
    return save, out.getvalue()


def test_tiny_config_through_the_tool(tool_run):
    import av
    save, out = tool_run
    assert "=== inference summary ===" in out and "OpenSora2Sampler 4 steps, cfg 5.0" in out
    assert "9 frames, 64x64" in out and "latent [3, 8, 8]" in out and "seed 7" in out
    for i in range(2):
        with av.open(str(save / f"sample_{i:04d}.mp4")) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
        assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
        lat = torch.load(save / f"sample_{i:04d}.latents.pt", weights_only=True)
        assert lat.shape == (16, 3, 8, 8) and torch.isfinite(lat).all()
    # the flags reached the run and prompt i is seeded with seed + i: the pipeline's latents
    pipe = build_v2_from_config(_tiny(num_steps=4, guidance=5.0, seed=7), device="cpu")
    ref = pipe.generate(["a blue square"], seeds=[8])["latents"][0]
    torch.testing.assert_close(
        torch.load(save / "sample_0001.latents.pt", weights_only=True), ref)


def test_two_ranks_give_the_single_process_latents(tool_run, tmp_path):
    save, _ = tool_run
    out = _tool([TINY, "--save-dir", str(tmp_path)] + FLAGS, torchrun=2)
    assert "ranks: 2 (sequence parallel: on)" in out
    for i in range(2):
        one = torch.load(save / f"sample_{i:04d}.latents.pt", weights_only=True)
        two = torch.load(tmp_path / f"sample_{i:04d}.latents.pt", weights_only=True)
        torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, needle", [
    (["sampling_option.num_steps=0"], "sampling_option.num_steps=0 is not accepted"),
    (["cond_type=i2v_head"], "ref=None is not accepted"),
    (["cond_type=v2v"], "cond_type='v2v' is not accepted"),
    (["prompt_refine=True"], "prompt_refine=True is not accepted"),
    (["motion_score=dynamic"], "motion_score='dynamic' is not accepted"),
    (["sampling_option.resolution=256px"], "resolution and aspect_ratio go together"),
    (["sampling_option.frames=3"], "sampling_option keys ['frames'] are not known"),
    (["scheduler.type=rflow"], "config keys ['scheduler'] are not known"),
    (["cfg_parallel=2"], "cfg_parallel=2 is not accepted"),
    (["model.num_heads=3", "model.hidden_size=48"], "do not divide the model's num_heads=3"),
    (["cache.type=Nope"], "Nope"),
    (["sampling_option.temporal_reduction=2"], "accepted: temporal_reduction=4"),
    (["ae_spatial_compression=32"], "ae_spatial_compression=32 is not accepted"),
    (["model.in_channels=128"], "model.in_channels=128 is not accepted"),
    (["fps_save=0"], "fps_save=0 is not accepted"),
    (["sampling_option.method=distill"], "this model has cond_embed=True"),
    (["cond_type=v2v_head", f"ref={TINY}"], "num_frames=9 has 3"),
])
def test_config_mistakes_are_one_line_exit_2(options, needle, capsys, tmp_path, monkeypatch):
    import opensora_duca.cli.inference as tool
    if "num_heads=3" in options[0]:
        monkeypatch.setenv("WORLD_SIZE", "2")

    def no_build(*a, **k):
        raise AssertionError("built despite a bad config")
    monkeypatch.setattr(tool, "build_v2_from_config", no_build)
    rc = inference_main([TINY, "--save-dir", str(tmp_path), "--no-progress",
                         "--cfg-options", *options])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert needle in err and err.startswith("inference.py: error:")


# ------------------------------------------------------------------------ the pipeline
def test_batch_does_not_change_a_video(pipe):
    prompts = ["a red circle", "a green triangle"]
    both = pipe.generate(prompts, seeds=[3, 4], batch_size=2)
    one = pipe.generate(prompts[1:], seeds=[4], batch_size=1)
    assert both["video"].shape == (2, 3, 9, 64, 64)
    torch.testing.assert_close(both["latents"][1:], one["latents"], rtol=1e-4, atol=1e-4)
    assert both["prompts"] == ["a red circle. 8 FPS. 4 motion score.",
                               "a green triangle. 8 FPS. 4 motion score."]
    assert not torch.equal(both["latents"][0], both["latents"][1])


def _video(frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, frames, 64, 64, generator=g) * 2 - 1


def test_i2v_puts_the_reference_frames_back():
    pipe = build_v2_from_config(_tiny(), device="cpu")
    with torch.no_grad():  # upstream starts cond_in at zero: give the condition an effect
        pipe.model.cond_in.weight.normal_(std=0.2, generator=torch.Generator().manual_seed(0))
    codec = TinyCausalCodec()
    head, tail = _video(1, 1), _video(1, 2)
    out = pipe.generate(["a cat"], seeds=[0], cond_type="i2v_loop", references=[[head, tail]])
    lat = out["latents"][0]
    torch.testing.assert_close(lat[:, :1], codec.encode(head[None])[0])
    torch.testing.assert_close(lat[:, -1:], codec.encode(tail[None])[0])
    out = pipe.generate(["a cat"], seeds=[0], cond_type="i2v_tail", references=[tail])
    torch.testing.assert_close(out["latents"][0][:, -1:], codec.encode(tail[None])[0])
    assert out["video"].shape == (1, 3, 9, 64, 64)
    # the condition changed the run: t2v with the same seed differs in the middle frame too
    t2v = pipe.generate(["a cat"], seeds=[0])
    assert not torch.allclose(t2v["latents"][0][:, 1], out["latents"][0][:, 1])


def test_v2v_head_runs_and_needs_enough_frames():
    pipe = build_v2_from_config(_tiny(**{"sampling_option.num_frames": 33}), device="cpu")
    ref = _video(40, 3)
    out = pipe.generate(["a dog"], seeds=[1], cond_type="v2v_head", references=[ref])
    assert out["video"].shape == (1, 3, 33, 64, 64) and out["latents"].shape[2] == 9
    with pytest.raises(ValueError, match="at least 33 frames"):
        pipe.generate(["a dog"], cond_type="v2v_tail", references=[_video(20)])


def test_reference_from_a_file(tmp_path):
    from PIL import Image
    path = tmp_path / "ref.png"
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:, 30:] = 255  # left half black, right half white
    Image.fromarray(arr).save(path)
    x = load_reference(str(path), (64, 64))
    # resized to cover 64 x 64 (128 x 64) and centre-cropped: black left, white right
    assert x.shape == (3, 1, 64, 64)
    assert float(x[:, 0, :, :20].max()) < -0.9 and float(x[:, 0, :, 44:].min()) > 0.9
    pipe = build_v2_from_config(_tiny(cond_type="i2v_head", ref=str(path)), device="cpu")
    out = pipe.generate(["a cat", "a dog"], seeds=[0, 1])
    first = TinyCausalCodec().encode(x[None])[0]
    for j in range(2):
        torch.testing.assert_close(out["latents"][j][:, :1], first)


def test_duca_cache_on_the_tiny_run(pipe):
    plain = pipe.generate(["a red circle"], seeds=[5])
    manager = pipe.attach_cache(dict(type="DuCa"))
    try:
        cached = pipe.generate(["a red circle"], seeds=[5])
        report = pipe.report()
    finally:
        pipe.remove_cache()
    assert "DuCa" in report and re.search(r"steps\s*:\s*6\b", report)
    assert cached["video"].shape == plain["video"].shape
    assert torch.isfinite(cached["latents"]).all()
    assert manager.stats() is not None
    # the run reused features: not the uncached latents, but close to them
    assert not torch.equal(cached["latents"], plain["latents"])
    err = (cached["latents"] - plain["latents"]).norm() / plain["latents"].norm()
    assert err < 0.5
    again = pipe.generate(["a red circle"], seeds=[5])  # detached: uncached again, exactly
    assert torch.equal(again["latents"], plain["latents"])


def test_cache_key_and_wrapper_build_a_cached_model():
    pipe = build_v2_from_config(_tiny(cache=dict(type="DuCa")), device="cpu")
    assert pipe.cache_manager is not None and pipe.cache_manager.policy.name == "DuCa"
    out = pipe.generate(["a cat"], seeds=[0])
    assert out["video"].shape == (1, 3, 9, 64, 64) and torch.isfinite(out["video"]).all()
    assert re.search(r"steps\s*:\s*6\b", pipe.report())
    wrapped = _tiny(model=dict(_delete_=True, type="DuCa", model=dict(type="MMDiT-cpu"),
                               cache=dict(type="FORA", interval=2)))
    assert is_v2_config(wrapped)
    pipe = build_v2_from_config(wrapped, device="cpu")
    assert pipe.cache_manager is not None and pipe.cache_manager.policy.name == "FORA"
    pipe.generate(["a cat"], seeds=[0])
    assert "FORA" in pipe.report()


# ---------------------------------------------------------- upstream's tables, by hand
@pytest.mark.parametrize("resolution, ratio, size", [
    ("256px", "16:9", (192, 336)),   # W = floor(sqrt(65536 16/9) / 16) 16 = 336, H = 192
    ("256px", "9:16", (336, 192)),
    ("256px", "1:1", (256, 256)),
    ("256px", "2.39:1", (160, 384)),  # floor(395.8 / 16) 16 = 384; floor(170.7 / 16) 16
    ("768px", "16:9", (576, 1024)),
    ("720p", "16:9", (720, 1280)),    # 720^2 16 / 9 pixels
])
def test_image_size_table(resolution, ratio, size):
    assert image_size_v2(resolution, ratio) == size


def test_image_size_errors():
    with pytest.raises(ValueError, match="resolution='256'"):
        image_size_v2("256", "16:9")
    with pytest.raises(ValueError, match="aspect_ratio='7:3'"):
        image_size_v2("256px", "7:3")


def test_prompt_text():
    assert prompt_text(["a cat ", "a dog.", "a cow. 24 FPS."], 24, "4") == [
        "a cat. 24 FPS. 4 motion score.", "a dog. 24 FPS. 4 motion score.",
        "a cow. 24 FPS. 4 motion score."]
    assert prompt_text(["a cat"], 16) == ["a cat. 16 FPS."]


def test_settings_aliases_and_rounding():
    cfg = _tiny(num_steps=3, guidance=2.0, num_frames=5)
    s = sampling_settings(cfg)
    assert s["sampler"]["num_steps"] == 3 and s["sampler"]["guidance"] == 2.0
    assert s["num_frames"] == 5 and s["seed"] == 42
    s = sampling_settings(_tiny(**{"sampling_option.height": 100, "sampling_option.seed": 7}))
    assert (s["height"], s["width"]) == (112, 64) and s["seed"] == 7
    s = sampling_settings(_tiny(resolution="256px", aspect_ratio="9:16"))
    assert (s["height"], s["width"]) == (336, 192)
    s = sampling_settings(_tiny(image_size=(48, 80), resolution="256px", aspect_ratio="1:1"))
    assert (s["height"], s["width"]) == (48, 80)
    with pytest.raises(ValueError, match="method='i2v'"):
        sampling_settings(_tiny(cond_type="i2v_head", **{"sampling_option.method": "distill"}))


def test_shipped_configs_resolve(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    for name, size, frames in (("256px", (192, 336), 129), ("768px", (576, 1024), 129),
                               ("duca", (192, 336), 129), ("high_compression", (576, 1024), 128),
                               ("tiny", (64, 64), 9)):
        cfg = Config.fromfile(os.path.join(CONFIGS, f"{name}.py"))
        cfg.prompt = ["a cat"]
        assert is_v2_config(cfg)
        if name != "tiny":  # the local weights must exist before anything is built
            with pytest.raises(ValueError, match="model.from_pretrained='./ckpts/Open_Sora"):
                check_v2_inference_config(cfg)
            cfg.merge_from_dict({"model.from_pretrained": str(weights),
                                 "ae.from_pretrained": str(weights),
                                 "t5.from_pretrained": str(tmp_path),
                                 "clip.from_pretrained": str(tmp_path)})
        check_v2_inference_config(cfg)
        s = sampling_settings(cfg)
        assert (s["height"], s["width"]) == size and s["num_frames"] == frames, name
    hc = Config.fromfile(os.path.join(CONFIGS, "high_compression.py"))
    assert hc.ae.type == "dc_ae" and hc.model.in_channels == 128 and hc.patch_size == 1


def test_upstream_parts_fail_with_one_line(tmp_path):
    cfg = _tiny(t5=dict(_delete_=True, type="text_embedder", from_pretrained="/nonexistent/t5",
                        max_length=512))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded") as err:
        build_v2_from_config(cfg, device="cpu")
    assert "\n" not in str(err.value)
    folder = tmp_path / "t5"
    folder.mkdir()
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs the 'transformers' package") as err:
            HFTextEmbedder(str(folder), 512)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="kind='bert'"):
        HFTextEmbedder(str(folder), 512, kind="bert")
    try:
        import opensora  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs upstream Open-Sora 2.0") as err:
            build_v2_from_config(_tiny(ae=dict(_delete_=True, type="hunyuan_vae")),
                                 device="cpu")
        assert "\n" not in str(err.value)


def test_hashed_text_embedder():
    t5 = HashedTextEmbedder(dim=8, max_length=5)
    clip = HashedTextEmbedder(dim=8, pooled=True)
    a = t5(["A cat, a dog", ""])
    assert a.shape == (2, 5, 8)
    # "a" at positions 0 and 2: the same word vector, different position features
    pos = t5.positions(5)
    torch.testing.assert_close(a[0, 0] - pos[0], a[0, 2] - pos[2])
    torch.testing.assert_close(a[1, 0] - pos[0], t5.vector("<pad>"))
    assert torch.equal(HashedTextEmbedder(dim=8, max_length=5)(["a cat"]), t5(["a cat"]))
    v = clip(["a cat", ""])
    assert v.shape == (2, 8)
    torch.testing.assert_close(v[0], (clip.vector("a") + clip.vector("cat")) / 2)
    assert t5(["x"], added_tokens=3, seq_align=4).shape == (1, 5, 8)  # 3 + 5 = 8
    assert t5(["x"], added_tokens=2, seq_align=4).shape == (1, 6, 8)  # padded to 2 + 6


def test_teacache_calibration_fitted_on_the_mmdit(tmp_path, pipe):
    """tools/calibrate.py on a 2.0 config fits on the MMDiT (its identity recorded, one point
    per clip and step >= 1, x the first double block's modulated-input change as TeaCache
    measures it); TeaCache runs with the file on that model."""
    import json

    from opensora_duca.cache.calibrate import model_identity
    from opensora_duca.cli.calibrate import main as calibrate_main

    out = tmp_path / "cal.json"
    assert calibrate_main([TINY, "--prompt", "a red ball", "--prompt", "waves", "--seeds", "100",
                           "101", "--degree", "2", "--out", str(out)]) == 0
    fit = json.loads(out.read_text())
    steps = _tiny().sampling_option.num_steps
    assert fit["samples"] == (steps - 1) * 2 * 2 and fit["steps"] == steps
    assert fit["model"] == model_identity(pipe.model)
    # x by hand: the first double block's modulated image input, steps 0 and 1, clip 0's rows
    seen = []
    block = pipe.model.double_blocks[0]

    def grab(mod, args):
        img, vec = args[0], args[2]
        shift, scale = torch.nn.functional.linear(
            torch.nn.functional.silu(vec), mod.img_mod.lin.weight,
            mod.img_mod.lin.bias)[:, None, :].chunk(6, -1)[:2]
        seen.append(((1 + scale) * torch.nn.functional.layer_norm(
            img, img.shape[-1:], eps=1e-6) + shift).double())
    handle = block.register_forward_pre_hook(grab)
    try:
        pipe.generate(["a red ball"], seeds=[100])  # the calibration's first run (batch 1)
    finally:
        handle.remove()
    a, b = seen[1], seen[0]  # the clip's three guidance branches decide together
    assert fit["x"][0] == pytest.approx(float((a - b).abs().sum() / b.abs().sum()), rel=1e-6)
    pipe.attach_cache(dict(type="TeaCache", threshold=0.5, calibration=str(out)))
    try:
        pipe.generate(["a red ball"], seeds=[3])
        labels = pipe.cache_manager.stats()["step_labels"]
    finally:
        pipe.remove_cache()
    assert len(labels) == steps
    from opensora_duca.cache import apply_cache
    from opensora_duca.registry import MODELS, build_module

    other = build_module(dict(_tiny().model), MODELS)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)  # other weights, same layout
    with pytest.raises(ValueError, match="was fitted on another model"):
        apply_cache(other, dict(type="TeaCache", calibration=str(out)))
