"""Reliability round 3 (issue 21): every case is one row of a table.

A row is ``(id, call, code, pattern, files)``: ``call(tmp_path)`` runs a tool's ``main`` in this
process (or an API function) and returns ``(code, message)`` -- the exit code and stderr of a
tool, or the exception's class name and text of a call; ``pattern`` is a regular expression the
one-line message must match; ``files(tmp_path)`` (or None) checks what is on disk afterwards.
Tools are called in-process and before their expensive work, so the table runs in seconds.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
from typing import Callable, NamedTuple, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = os.path.join(ROOT, "configs/demo/inference.py")
TINY_CFG = os.path.join(ROOT, "configs/tiny/inference.py")


class Row(NamedTuple):
    id: str
    call: Callable
    code: object  # an exit code, or the name of the exception a call raises
    pattern: str
    files: Optional[Callable] = None


def tool(main, *argv):
    """Run a tool's ``main(argv)`` here; (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, err.getvalue()


def api(fn, *args, **kwargs):
    """Call ``fn``; (exception class name, message) or ("ok", repr of the result)."""
    try:
        return "ok", repr(fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - the table checks the class
        return type(exc).__name__, str(exc)


# ---------------------------------------------------------------------------------------------
# 1. frontier: no default --out in tracked results; a mismatching / unreadable / locked file is
#    refused with one line and kept as it is

def _frontier(*argv):
    from opensora_duca.cli.frontier import main
    return tool(main, *argv)


FOREIGN = {"meta": {"config": "other.py", "quick": False, "prompts": ["x"], "seeds": [0],
                    "steps": 30}, "reference": {"policy": "none"}, "points": [{"family": "A"}]}


def _frontier_on(content):
    def call(tmp_path):
        out = tmp_path / "f.json"
        out.write_text(content)
        return _frontier("--quick", "--out", out)
    return call


def _kept(content):
    def files(tmp_path):
        assert (tmp_path / "f.json").read_text() == content
        assert not (tmp_path / "f.png").exists()
    return files


def _frontier_locked(tmp_path):
    from opensora_duca.utils.atomic import exclusive_lock
    out = tmp_path / "f.json"
    with exclusive_lock(str(out)):
        return _frontier("--quick", "--out", out)


def _frontier_default_out(tmp_path):
    from opensora_duca.cli.frontier import parse_args
    out = parse_args([]).out
    tracked = os.path.join(ROOT, "docs")
    return ("tracked" if os.path.abspath(out).startswith(tracked) else "ok"), out


def _frontier_other_calibration(tmp_path):
    from opensora_duca.cli import frontier
    from opensora_duca.pipeline import build_from_config
    frontier.build_from_config = build_from_config  # the no_build fixture restores it
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(dict(coefficients=[1.0, 0.0], model=dict(
        type="STDiT3", parameters=1, shapes="0", weights="0"))))
    return _frontier("--quick", "--families", "TeaCache", "--calibration", cal, "--out",
                     tmp_path / "f.json", "--threads", 1)


ROWS = [
    Row("frontier-calibration-of-another-model", _frontier_other_calibration, 2,
        r"TeaCache calibration=.*cal\.json' was fitted on another model",
        lambda p: not (p / "f.json").exists() or pytest.fail("written")),
    Row("frontier-default-out-untracked", _frontier_default_out, "ok", r"^outputs/"),
    Row("frontier-foreign-meta", _frontier_on(json.dumps(FOREIGN)), 2,
        r"f\.json' holds a sweep of other settings \(differs in config, prompts, quick, "
        r"steps\); it is kept", _kept(json.dumps(FOREIGN))),
    Row("frontier-truncated-json", _frontier_on('{"meta": {"config": '), 2,
        r"f\.json' cannot be read.*JSONDecodeError.*it is kept", _kept('{"meta": {"config": ')),
    Row("frontier-not-a-sweep", _frontier_on("[1, 2]"), 2, r"is not a frontier sweep",
        _kept("[1, 2]")),
    Row("frontier-locked", _frontier_locked, 2, r"f\.json is being written by another process",
        lambda p: not (p / "f.json").exists() or pytest.fail("written")),
    Row("frontier-negative-seed", lambda p: _frontier("--seeds", "-1", "--out", p / "f.json"), 2,
        r"--seeds -1: accepted: integers in \[0, 2\*\*63\)"),
]


# ---------------------------------------------------------------------------------------------
# 6. determinism: identical inputs give identical bytes (mp4 at the demo size, .latents.pt)

def _demo_frames(seed=0):
    import numpy as np
    t = np.linspace(0, 1, 32)
    base = np.sin(6 * t + seed)[:, None] * np.cos(4 * t)[None, :] * 120 + 128
    frames = np.stack([np.roll(base, k, axis=1) for k in range(8)])[..., None]
    return np.concatenate([frames, frames[:, ::-1], frames * 0.5], -1).astype(np.uint8)


def _mp4_repeat(tmp_path):
    """The same 8 x 32 x 32 frames 12 times, other videos encoded in between: one file."""
    from opensora_duca.utils.video import save_video
    frames, digests = _demo_frames(), set()
    for i in range(12):
        save_video(_demo_frames(i + 1), str(tmp_path / "other.mp4"))
        save_video(frames, str(tmp_path / f"v{i}.mp4"))
        digests.add((tmp_path / f"v{i}.mp4").read_bytes())
    return "ok", f"{len(digests)} distinct files"


def _mp4_no_swscale(tmp_path):
    """The encoder gets yuv420p frames made here: no swscale conversion (whose code path
    depends on size, alignment and threads) between the frames and libx264."""
    import av

    from opensora_duca.utils.video import save_video

    orig = av.video.reformatter.VideoReformatter.reformat
    converted = []

    def spy(self, frame, *a, **k):  # PyAV calls it for every frame; a no-op returns the frame
        out = orig(self, frame, *a, **k)
        converted.append(out is not frame)
        return out
    av.video.reformatter.VideoReformatter.reformat = spy
    try:
        save_video(_demo_frames(), str(tmp_path / "v.mp4"))
    finally:
        av.video.reformatter.VideoReformatter.reformat = orig
    return "ok", f"{sum(converted)} frames converted by swscale"


def _latents_bytes(tmp_path):
    import torch

    from opensora_duca.utils.atomic import save_torch
    lat = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    save_torch(str(tmp_path / "a.latents.pt"), lat)
    save_torch(str(tmp_path / "b.latents.pt"), lat.clone())
    same = (tmp_path / "a.latents.pt").read_bytes() == (tmp_path / "b.latents.pt").read_bytes()
    return "ok", f"identical={same}"


ROWS += [
    Row("mp4-32x32-identical-bytes", _mp4_repeat, "ok", r"^1 distinct files$"),
    Row("mp4-no-swscale-between-frames-and-encoder", _mp4_no_swscale, "ok",
        r"^0 frames converted"),
    Row("latents-pt-identical-bytes", _latents_bytes, "ok", r"identical=True"),
]


# ---------------------------------------------------------------------------------------------
# 4. resume decides by what produced a file (its record), not by its name

def _infer(*argv):
    from opensora_duca.cli.inference import main
    return tool(main, *argv)


def _tiny(tmp_path, *extra):
    from opensora_duca.cli.inference import merge_args, parse_args
    from opensora_duca.utils.config import load_config
    args = parse_args([TINY_CFG, "--save-dir", str(tmp_path), *map(str, extra)])
    return merge_args(load_config(TINY_CFG, args.cfg_options), args), args


def _made(tmp_path, name, prompt, seed, *extra):
    """A finished video ``name`` and the record of a run of ``extra`` flags for ``prompt``."""
    from opensora_duca.cli.inference import run_identity
    from opensora_duca.utils.atomic import write_json
    from opensora_duca.utils.video import save_video
    save_video(_demo_frames(), str(tmp_path / f"{name}.mp4"))
    if prompt is not None:
        cfg, _ = _tiny(tmp_path, *extra)
        write_json(str(tmp_path / f"{name}.json"), run_identity(cfg, prompt, seed))
    return (tmp_path / f"{name}.mp4").read_bytes()


def _resume_other(*extra, prompt="a red circle moving left"):
    def call(tmp_path):
        _made(tmp_path, "sample_0000", prompt, 42, *extra)
        return _infer(TINY_CFG, "--save-dir", tmp_path, "--end-index", 1)
    return call


def _video_kept(tmp_path):
    assert (tmp_path / "sample_0000.mp4").read_bytes() == _made(tmp_path / "x", "v", None, 0)


def _resume_same(tmp_path):
    from opensora_duca.cli.inference import plan_outputs
    _made(tmp_path, "sample_0000", "a red circle moving left", 42)
    cfg, args = _tiny(tmp_path)
    names, todo = plan_outputs(cfg, args, cfg.prompt, [0, 1], str(tmp_path), 42)
    return "ok", f"names={list(names.values())} todo={todo}"


def _prompt_as_path(tmp_path):
    from opensora_duca.cli.inference import plan_outputs
    _made(tmp_path, "a_red_circle_moving_left", "a red circle moving left!", 42,
          "--prompt-as-path")
    cfg, args = _tiny(tmp_path, "--prompt-as-path", "--prompt", "a red circle moving left")
    names, todo = plan_outputs(cfg, args, cfg.prompt, [0], str(tmp_path), 42)
    return "ok", f"names={list(names.values())} todo={todo}"


ROWS += [
    Row("resume-other-steps", _resume_other("--num-sampling-steps", 3), 2,
        r"sample_0000\.mp4 exists and was made by other settings \(differs in scheduler\); "
        r"it is kept", _video_kept),
    Row("resume-other-prompt", _resume_other(prompt="a blue square"), 2,
        r"differs in prompt\).*prompt 0: 'a red circle moving left'", _video_kept),
    Row("resume-other-seed", _resume_other("--seed", 1), 2, r"differs in seed\)"),
    Row("resume-other-policy", _resume_other("--cfg-options", "cache.type=FORA"), 2,
        r"differs in cache\)"),
    Row("resume-no-record", lambda p: (_made(p, "sample_0000", None, 0),
                                       _infer(TINY_CFG, "--save-dir", p))[1], 2,
        r"differs in no record \(sample_0000\.json\)", _video_kept),
    Row("resume-same-settings-skips", _resume_same, "ok",
        r"names=\['sample_0000', 'sample_0001'\] todo=\[1\]"),
    Row("prompt-as-path-other-prompt-gets-own-file", _prompt_as_path, "ok",
        r"names=\['a_red_circle_moving_left-[0-9a-f]{8}'\] todo=\[0\]"),
]


# ---------------------------------------------------------------------------------------------
# 7. silent acceptance: refused with the key, the value and what is accepted

def _small_model(depth=1, seed=0):
    import torch

    from opensora_duca.models.stdit3 import STDiT3
    torch.manual_seed(seed)
    return STDiT3(in_channels=4, hidden_size=32, depth=depth, num_heads=2, caption_channels=8,
                  model_max_length=5).eval()


def _teacache_file(text):
    def call(tmp_path):
        from opensora_duca.cache import build_policy
        (tmp_path / "cal.json").write_text(text)
        return api(build_policy, dict(type="TeaCache", calibration=str(tmp_path / "cal.json")))
    return call


def _calibration_other_model(tmp_path):
    from opensora_duca.cache import build_policy
    from opensora_duca.cache.calibrate import check_calibration_model, model_identity
    (tmp_path / "cal.json").write_text(json.dumps(dict(
        coefficients=[1.0, 0.0], model=model_identity(_small_model(seed=0)))))
    policy = build_policy(dict(type="TeaCache", calibration=str(tmp_path / "cal.json")))
    assert api(check_calibration_model, policy, _small_model(seed=0))[0] == "ok"
    return api(check_calibration_model, policy, _small_model(seed=1))


def _checkpoint(mutate):
    def call(tmp_path):
        from safetensors.torch import save_file

        from opensora_duca.models.checkpoint import load_checkpoint
        sd = {k: v.clone().contiguous() for k, v in _small_model().state_dict().items()}
        mutate(sd)
        save_file(sd, str(tmp_path / "w.safetensors"))
        return api(load_checkpoint, _small_model(), str(tmp_path / "w.safetensors"))
    return call


def _to_int(sd):
    sd["t_block.1.weight"] = sd["t_block.1.weight"].long()


def _to_bool(sd):
    sd["final_layer.linear.bias"] = sd["final_layer.linear.bias"] > 0


def _reshape(sd):
    sd["t_block.1.weight"] = sd["t_block.1.weight"][:3]


def _empty_blocks(tmp_path):
    import torch

    from opensora_duca.cache import apply_cache
    model = _small_model()
    model.spatial_blocks = torch.nn.ModuleList()
    model.temporal_blocks = torch.nn.ModuleList()
    return api(apply_cache, model, dict(type="DuCa"))


def _rflow(**kw):
    from opensora_duca.registry import SCHEDULERS, build_module
    return lambda tmp_path: api(build_module, dict(type="rflow", **kw), SCHEDULERS)


def _teacache(**kw):
    from opensora_duca.cache import build_policy
    return lambda tmp_path: api(build_policy, dict(type="TeaCache", **kw))


ROWS += [
    Row("calibration-coefficients-string", _teacache_file('{"coefficients": "12"}'),
        "ValueError", r"calibration=.*cal\.json.*a non-empty 'coefficients' list of finite "
        r"numbers \(got '12'\)"),
    Row("calibration-coefficients-nan", _teacache_file('{"coefficients": [NaN, 1.0]}'),
        "ValueError", r"finite numbers \(got \[nan, 1\.0\]\)"),
    Row("calibration-coefficients-infinity", _teacache_file('{"coefficients": [Infinity]}'),
        "ValueError", r"finite numbers \(got \[inf\]\)"),
    Row("calibration-x-range-nan", _teacache_file('{"coefficients": [1], "x_range": [NaN, 1]}'),
        "ValueError", r"'x_range' None or \[lo, hi\] of finite numbers"),
    Row("coefficients-given-infinite", _teacache(coefficients=[1.0, float("inf")]), "ValueError",
        r"coefficients.*inf.*a non-empty list of finite numbers"),
    Row("coefficients-given-string", _teacache(coefficients="12"), "ValueError",
        r"coefficients.*'12'.*a non-empty list of numbers"),
    Row("calibration-fitted-on-another-model", _calibration_other_model, "ValueError",
        r"TeaCache calibration=.*cal\.json' was fitted on another model \(differs in weights"),
    Row("rflow-transform-scale-negative", _rflow(transform_scale=-1), "ValueError",
        r"transform_scale=-1; accepted: a finite number > 0"),
    Row("rflow-transform-scale-zero", _rflow(transform_scale=0), "ValueError",
        r"transform_scale=0; accepted"),
    Row("rflow-num-timesteps-zero", _rflow(num_timesteps=0), "ValueError",
        r"num_timesteps=0; accepted: an integer >= 1"),
    Row("rflow-cfg-scale-nan", _rflow(cfg_scale=float("nan")), "ValueError",
        r"cfg_scale=nan; accepted: a finite number"),
    Row("checkpoint-int64-weights", _checkpoint(_to_int), "CheckpointMismatchError",
        r"non-floating-point values for floating-point weights \(t_block\.1\.weight int64\)"),
    Row("checkpoint-bool-weights", _checkpoint(_to_bool), "CheckpointMismatchError",
        r"\(final_layer\.linear\.bias bool\); accepted: float32"),
    Row("checkpoint-wrong-shape-one-line", _checkpoint(_reshape), "CheckpointMismatchError",
        r"^checkpoint .* does not match STDiT3: shape mismatches: t_block\.1\.weight "
        r"\(3, 32\) vs model \(192, 32\); accepted: [^\n]*$"),
    Row("empty-spatial-blocks", _empty_blocks, "TypeError", r"spatial_blocks is empty"),
]


# ---------------------------------------------------------------------------------------------
# 2 / 3 (root cause): the sampler keeps float32 timesteps and latents, as upstream 1.2 / 1.3

def _sampler_dtypes(tmp_path):
    """A 300-step bf16 run: the model gets float32 timesteps, all distinct (bf16 would merge
    those near 1000), and float32 latents from the second step on."""
    import torch

    from opensora_duca.schedulers.rflow import RFlow
    seen = []

    def model(z, t, y, mask=None, **kw):
        seen.append((z.dtype, t.dtype, float(t[0])))
        return torch.zeros(z.shape, dtype=torch.float32)
    z = torch.zeros(1, 2, 1, 2, 2, dtype=torch.bfloat16)
    out = RFlow(num_sampling_steps=300).sample(model, z, torch.zeros(1, 1, 2, 4),
                                               torch.zeros(1, 1, 2, 4), progress=False)
    ts = [t for _, _, t in seen]
    return "ok", (f"latents {sorted({str(d) for d, _, _ in seen[1:]})} timesteps "
                  f"{sorted({str(d) for _, d, _ in seen})} distinct={len(set(ts)) == len(ts)} "
                  f"out {out.dtype}")


def _bf16_cached_300_steps(tmp_path):
    from opensora_duca.pipeline import build_from_config
    cfg = dict(image_size=(16, 16), num_frames=1, fps=8, seed=0, dtype="bf16",
               model=dict(type="STDiT3-S/2", depth=1, hidden_size=32, num_heads=2),
               vae=dict(type="DemoCodec"),
               text_encoder=dict(type="DemoTextEncoder", output_dim=8, model_max_length=6),
               scheduler=dict(type="rflow", num_sampling_steps=300), cache=dict(type="DuCa"))
    pipe = build_from_config(cfg, device="cpu")
    out = pipe.generate(["a red circle moving left"], progress=False)
    return "ok", f"finite={bool(out['video'].isfinite().all())}"


ROWS += [
    Row("rflow-float32-timesteps-and-latents", _sampler_dtypes, "ok",
        r"latents \['torch.float32'\] timesteps \['torch.float32'\] distinct=True "
        r"out torch.float32"),
    Row("bf16-duca-300-steps", _bf16_cached_300_steps, "ok", r"finite=True"),
]


# ---------------------------------------------------------------------------------------------
# 8 / 9 / 11. one line, exit 2, before any work; late errors made early; small ones

def _real_build():
    """Undo the ``no_build`` fixture for this call (it restores its patch afterwards)."""
    from opensora_duca.cli import inference
    from opensora_duca.pipeline import build_from_config
    inference.build_from_config = build_from_config


def _no_compiler(tmp_path):
    from opensora_duca.utils import compile as comp
    orig = comp._cxx_compiler
    comp._cxx_compiler = lambda: None
    try:
        return _infer(TINY_CFG, "--compile", "--device", "cpu", "--save-dir", tmp_path)
    finally:
        comp._cxx_compiler = orig


def _hf_folder(config):
    def call(tmp_path):
        from safetensors.torch import save_file

        from opensora_duca.registry import MODELS, build_module
        folder = tmp_path / "hf"
        folder.mkdir()
        model = build_module(dict(type="STDiT3-S/2", depth=1, hidden_size=32, num_heads=2),
                             MODELS)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(dict(dict(
            depth=1, hidden_size=32, num_heads=2), **config)))
        return api(build_module, dict(type="STDiT3-S/2", from_pretrained=str(folder),
                                      force_huggingface=True), MODELS)
    return call


def _duca(**kw):
    from opensora_duca.cache import build_policy
    return lambda tmp_path: api(build_policy, dict(type="DuCa", **kw))


def _duca_exp_overflow(tmp_path):
    from opensora_duca.cache import build_policy
    policy = build_policy(dict(type="DuCa", ratio_schedule=dict(type="exp", decay=1e10)))
    return api(lambda: [policy.plan(s, 300, []) for s in range(290, 300)][-1] is not None)


def _wrapper_and_cache(tmp_path):
    from opensora_duca.config_check import check_cache
    cfg = dict(cache=dict(type="FORA"), model=dict(type="DuCa", model=dict(type="STDiT3-S/2")))
    return api(check_cache, cfg, 1)


def _prompt_file(lines=None, data=None):
    def call(tmp_path):
        path = tmp_path / "prompts.txt"
        if data is not None:
            path.write_bytes(data)
        else:
            path.write_text("\n".join(lines) + "\n")
        _real_build()
        return _infer(TINY_CFG, "--prompt-path", path, "--save-dir", tmp_path / "out",
                      "--num-sampling-steps", 1, "--no-progress")
    return call


def _no_videos(tmp_path):
    assert not list(tmp_path.rglob("*.mp4")), list(tmp_path.rglob("*"))


def _read_only_save_dir(tmp_path):
    from opensora_duca.utils import atomic
    out = tmp_path / "ro"
    out.mkdir()
    orig = atomic.os.access
    atomic.os.access = lambda p, m: False if os.path.abspath(p) == str(out) else orig(p, m)
    try:
        return _infer(TINY_CFG, "--save-dir", out)
    finally:
        atomic.os.access = orig


def _nan_output(tmp_path):
    _real_build()
    return _infer(TINY_CFG, "--save-dir", tmp_path, "--cfg-scale", "1e308", "--prompt",
                  "a red circle moving left", "--num-sampling-steps", 2, "--no-progress")


def _sigterm(tmp_path):
    """SIGTERM while a video is being written: exit 143, no temporary file left."""
    import signal

    from opensora_duca.cli import inference
    _real_build()
    orig = inference.save_video

    def killed_midway(video, path, **kw):
        from opensora_duca.utils.atomic import atomic_path
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half a video")
            os.kill(os.getpid(), signal.SIGTERM)
    inference.save_video = killed_midway
    try:
        return _infer(TINY_CFG, "--save-dir", tmp_path, "--prompt", "a red circle moving left",
                      "--num-sampling-steps", 1, "--no-progress")
    finally:
        inference.save_video = orig


def _no_partial(tmp_path):
    left = [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")
            or p.suffix == ".mp4"]
    assert not left, left


def _umask_mode(tmp_path):
    import torch

    from opensora_duca.cli.train import export_safetensors
    old = os.umask(0o022)
    try:
        export_safetensors({"w": torch.zeros(2)}, str(tmp_path / "m.safetensors"),
                           torch.float32, {})
    finally:
        os.umask(old)
    return "ok", oct(os.stat(tmp_path / "m.safetensors").st_mode & 0o777)


def _demo_cfg(tmp_path, **keys):
    text = open(DEMO_CFG).read().replace("{{ fileDirname }}", os.path.dirname(DEMO_CFG))
    text += "".join(f"\n{k} = {v!r}" for k, v in keys.items())
    (tmp_path / "demo_cfg.py").write_text(text)
    return str(tmp_path / "demo_cfg.py")


def _demo(*argv, **keys):
    def call(tmp_path):
        from opensora_duca.cli.demo import main
        return tool(main, _demo_cfg(tmp_path, **keys), "--save-dir", tmp_path / "out", *argv)
    return call


def _demo_string_prompt(tmp_path):
    from opensora_duca.cli import demo
    seen = {}
    orig = demo.check_ranks_agree
    demo.check_ranks_agree = lambda settings: seen.update(settings) or orig(settings)
    try:
        code, err = tool(demo.main, _demo_cfg(tmp_path, prompt="a red circle moving left"),
                         "--save-dir", tmp_path / "out")
    except Built:
        pass
    finally:
        demo.check_ranks_agree = orig
    return "ok", f"prompts={seen.get('prompts')}"


def _calibrate(*argv):
    def call(tmp_path):
        from opensora_duca.cli.calibrate import main
        return tool(main, *argv)
    return call


LONG = "a red circle moving left " * 20000  # 500 KB


ROWS += [
    Row("compile-without-cxx-compiler", _no_compiler, 2,
        r"inductor backend needs a C\+\+ compiler.*aot_eager"),
    Row("compile-bogus-backend", lambda p: _infer(
        TINY_CFG, "--save-dir", p, "--cfg-options", "compile.backend=nope"), 2,
        r"compile\.backend='nope' is not accepted; accepted: a torch\.compile backend"),
    Row("hf-config-patch-size-0", _hf_folder(dict(patch_size=0)), "ValueError",
        r"patch_size=0: accepted: three positive integers"),
    Row("hf-config-mlp-ratio-negative", _hf_folder(dict(mlp_ratio=-1)), "ValueError",
        r"mlp_ratio=-1: accepted: a finite number > 0"),
    Row("hf-config-depth-40", _hf_folder(dict(depth=40)), "ValueError",
        r"config\.json depth=40 but the weights hold 1 blocks"),
    Row("duca-warmup-0-aggressive-first", _duca(
        warmup_steps=0, tables=dict(spatial_attn=["aggressive", "full", "conservative"])),
        "ValueError", r"warmup_steps=0.*first entries \{'spatial_attn': 'aggressive'\}"),
    Row("duca-warmup-0-full-first-accepted", _duca(warmup_steps=0), "ok", r"DuCa"),
    Row("duca-exp-schedule-overflow", _duca_exp_overflow, "ok", r"True"),
    Row("wrapper-and-top-level-cache", _wrapper_and_cache, "ValueError", r"cache is set twice"),
    Row("dist-timeout-1e300", lambda p: _infer(TINY_CFG, "--save-dir", p, "--dist-timeout",
                                               "1e300"), 2,
        r"dist_timeout=1e\+300 is not accepted; accepted: a number of seconds in \(0, 1e\+07\]"),
    Row("device-tpu", lambda p: _infer(TINY_CFG, "--save-dir", p, "--device", "tpu"), 2,
        r"--device='tpu' is not accepted; accepted: cpu, cuda or cuda:N"),
    Row("device-cuda-without-cuda", lambda p: _infer(TINY_CFG, "--save-dir", p, "--device",
                                                     "cuda:7"), 2,
        r"--device='cuda:7' is not accepted; accepted: cpu|cuda:N with N <"),
    Row("seed-beyond-64-bits", lambda p: _infer(TINY_CFG, "--save-dir", p, "--seed", 2 ** 70), 2,
        r"seed=1180591620717411303424 is not accepted; accepted: an int in \[0, 2\*\*63\)"),
    Row("sample-name-300-characters", lambda p: _infer(TINY_CFG, "--save-dir", p,
                                                       "--sample-name", "n" * 300), 2,
        r"sample_name: the file name 'n{40}\.\.\.\(316 characters\)' is too long"),
    Row("save-dir-read-only", _read_only_save_dir, 2, r"save_dir=.*ro'?: the folder .*ro is "
        r"not writable"),
    Row("save-dir-under-a-file", lambda p: (p.joinpath("f").write_text("x"), _infer(
        TINY_CFG, "--save-dir", p / "f" / "out"))[1], 2, r"f is a file, not a folder"),
    Row("prompt-file-61st-unknown-word", _prompt_file(["a red circle moving left"] * 60
                                                      + ["a red zebra moving left"]), 2,
        r"prompt 'a red zebra moving left': words \['zebra'\]", _no_videos),
    Row("prompt-file-not-utf8", _prompt_file(data=b"a red circle\n\xff\xfe bad\n"), 2,
        r"prompt_path='.*prompts\.txt' is not UTF-8 text"),
    Row("prompt-500kb-not-echoed", lambda p: (_real_build(), _infer(
        TINY_CFG, "--save-dir", p, "--prompt", LONG + "zebra", "--num-sampling-steps", 1))[1],
        2, r"^.{0,700}characters in all\)\n$"),
    Row("nan-output-says-nan", _nan_output, 1,
        r"latents of prompt 0 .* are not finite \(NaN or Inf\)", _no_videos),
    Row("sigterm-leaves-no-partial", _sigterm, 143, r"terminated \(SIGTERM\)", _no_partial),
    Row("exported-safetensors-follow-umask", _umask_mode, "ok", r"^0o644$"),
    Row("demo-compare-caches-dotdot", _demo(compare_caches={"..": dict(type="FORA")}), 2,
        r"compare_caches: run name '\.\.' is not accepted"),
    Row("demo-steps-0", _demo("--num-sampling-steps", 0), 2,
        r"--num-sampling-steps 0: accepted: an integer >= 1"),
    Row("demo-string-prompt", _demo_string_prompt, "ok", r"prompts=\['a red circle moving left'\]"),
    Row("calibrate-string-prompt", _calibrate(
        _demo_cfg.__call__ if False else DEMO_CFG, "--cfg-options", "prompt=abcdef", "--steps",
        3, "--seeds", 0, "--degree", 2, "--out", "/tmp/never-written-cal.json"), 2,
        r"3 steps x 1 prompts x 1 seeds give 2"),
    Row("calibrate-out-under-a-file", lambda p: (p.joinpath("f").write_text("x"), _calibrate(
        DEMO_CFG, "--out", p / "f" / "cal.json")(p))[1], 2, r"f is a file, not a folder"),
    Row("calibrate-negative-seed", _calibrate(DEMO_CFG, "--seeds", -1), 2,
        r"--seeds -1: accepted"),
    Row("calibrate-missing-config", _calibrate("/no/such/config.py"), 2, r"/no/such/config\.py"),
    Row("frontier-missing-config", lambda p: _frontier("--config", "/no/such.py", "--out",
                                                       p / "f.json"), 2, r"/no/such\.py"),
]


# training checkpoints: unreadable or misfit ones refused in one line; a full disk is one line

TRAIN = dict(model=dict(type="STDiT3-demo", depth=1, hidden_size=32, num_heads=2),
             text_encoder=dict(type="DemoTextEncoder", output_dim=16, model_max_length=8),
             vae=dict(type="DemoCodec"),
             dataset=dict(type="SyntheticShapes", split="train", length=16, seed=0),
             seed=3, batch_size=2, steps=1, lr=3e-3, warmup_steps=1, lr_schedule="constant",
             ema_decay=0.9, ckpt_every=1, log_every=1, num_threads=1, export=None)


def _train_main(tmp_path, *argv):
    from opensora_duca.cli import train as T
    cfg = tmp_path / "train_cfg.py"
    cfg.write_text("".join(f"{k} = {v!r}\n" for k, v in dict(
        TRAIN, outputs=str(tmp_path / "out")).items()))
    return tool(T.main, cfg, "--no-progress", *argv)


def _trained_then(damage):
    def call(tmp_path):
        import torch
        code, err = _train_main(tmp_path)
        assert isinstance(code, dict), err  # main returns the run's summary on success
        ckpt = tmp_path / "out" / "checkpoints" / "last.pt"
        damage(ckpt, torch)
        return _train_main(tmp_path, "--steps", 2)
    return call


def _truncate(ckpt, torch):
    ckpt.write_bytes(ckpt.read_bytes()[:1000])


def _reshape_trainee(ckpt, torch):
    ck = torch.load(ckpt, weights_only=True)
    key = next(k for k in ck["trainee"] if k.endswith("t_block.1.weight"))
    ck["trainee"][key] = torch.zeros(3, 3)
    torch.save(ck, ckpt)


def _disk_full(tmp_path):
    import errno

    from opensora_duca.cli import train as T
    orig = T.save_torch

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")
    T.save_torch = full
    try:
        return _train_main(tmp_path)
    finally:
        T.save_torch = orig


ROWS += [
    Row("train-truncated-checkpoint", _trained_then(_truncate), 2,
        r"last\.pt' cannot be read \(.*truncated or not a checkpoint\)"),
    Row("train-wrong-shape-checkpoint", _trained_then(_reshape_trainee), 2,
        r"last\.pt' does not fit this model / optimizer \(.*size mismatch"),
    Row("train-disk-full-during-checkpoint", _disk_full, 1,
        r"could not write the checkpoint .*last\.pt at step 1 \(OSError: \[Errno 28\] No "
        r"space left on device\); the previous checkpoint is intact"),
]


def _memory_check(tmp_path):
    """The demo codec's real compression (16 pixels per token, not 1024) and the demo model's
    preset hidden size: 100000 frames are refused on a 32 GiB machine before anything runs."""
    from opensora_duca import config_check
    orig = config_check.memory_bytes
    config_check.memory_bytes = lambda device: 32 * 2 ** 30
    try:
        return _infer(DEMO_CFG, "--save-dir", tmp_path, "--num-frames", 100000)
    finally:
        config_check.memory_bytes = orig


def _bench(*argv):
    def call(tmp_path):
        from opensora_duca.bench import benches
        from opensora_duca.cli.benchmark import main
        orig = benches.build_bench

        def built(*a, **k):
            raise Built("the benchmark was built before the error was found")
        import opensora_duca.cli.benchmark as B
        B.build_bench = built
        try:
            return tool(main, *[str(a).replace("TMP", str(tmp_path)) for a in argv])
        finally:
            B.build_bench = orig
    return call


ROWS += [
    Row("benchmark-repeat-0", _bench("--repeat", 0), 2,
        r"^benchmark: error: --repeat=0 is not accepted; accepted: an int >= 1\n$"),
    Row("benchmark-bogus-policy", _bench("--policies", "Bogus"), 2, r"Bogus"),
    Row("benchmark-device-tpu", _bench("--device", "tpu"), 2, r"--device='tpu'"),
    Row("benchmark-bogus-backend", _bench("--compile", "--compile-backend", "nope",
                                          "--device", "cpu"), 2, r"compile\.backend='nope'"),
    Row("benchmark-json-under-a-file", lambda p: (p.joinpath("f").write_text("x"), _bench(
        "--json", "TMP/f/r.json")(p))[1], 2, r"f is a file, not a folder"),
    Row("benchmark-missing-config", _bench("--config", "/no/such.py"), 2,
        r"--config='/no/such\.py' is not accepted"),
    Row("benchmark-negative-seed", _bench("--seed", -1), 2, r"--seed=-1 is not accepted"),
]

def _stalled_rank(tmp_path):
    """What gloo raises in a collective when another rank stalls past --dist-timeout: one
    line, exit 1 (the job fails instead of a traceback on every rank)."""
    from opensora_duca.cli import inference
    patched = dict(init_distributed=lambda device, timeout: (0, 2, "cpu"),
                   check_ranks_agree=lambda settings: None)

    def stalled(*a, **k):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] "
                           "Timed out waiting 3000ms for recv operation to complete\nmore")
    patched["run"] = stalled
    orig = {k: getattr(inference, k) for k in patched}
    for k, v in patched.items():
        setattr(inference, k, v)
    try:
        return _infer(TINY_CFG, "--save-dir", tmp_path, "--dist-timeout", 3)
    finally:
        for k, v in orig.items():
            setattr(inference, k, v)


ROWS += [
    Row("stalled-rank-gloo-runtime-error", _stalled_rank, 1,
        r"^inference\.py: error: RuntimeError \(a rank died or did not answer within "
        r"dist_timeout=3\.0 s\): .*Timed out waiting 3000ms for recv operation to complete\n$"),
    Row("memory-check-real-codec", _memory_check, 2,
        r"num_frames=100000, image_size=\(32, 32\), batch_size=4 cannot fit"),
]


class Built(Exception):
    """Raised when a tool starts its expensive work (building the model)."""


# ---------------------------------------------------------------------------------------------
# 2/3 (the cache side), 5 and 10: run boundaries in bf16, one thread per run, the session
# contract (behaviour tested in depth in tests/test_cache_runs.py)

def _cached_small(policy):
    import torch
    from cache_utils import inputs, small_model

    from opensora_duca.cache import apply_cache
    m = small_model(depth=1)
    x, y, mask = inputs()
    return torch, m, apply_cache(m, policy), x, y, mask


def _nested_session(tmp_path):
    torch, m, mgr, x, y, mask = _cached_small(dict(type="FORA"))
    with mgr.session(num_steps=2):
        return api(lambda: mgr.session(num_steps=2).__enter__())


def _session_overrun(tmp_path):
    torch, m, mgr, x, y, mask = _cached_small(dict(type="FORA"))

    def run():
        with mgr.session(num_steps=2), torch.no_grad():
            for t in (900.0, 800.0, 700.0):
                m(x, torch.full((2,), t), y, mask=mask)
    return api(run)


def _frozen_grad_input(tmp_path):
    torch, m, mgr, x, y, mask = _cached_small(dict(type="DuCa"))
    m.requires_grad_(False)
    return api(lambda: m(x.requires_grad_(), torch.full((2,), 900.0), y, mask=mask))


def _session_names_passed_timestep(tmp_path):
    torch, m, mgr, x, y, mask = _cached_small(dict(type="FORA"))

    def run():
        with mgr.session(num_steps=3), torch.no_grad():
            m(x, torch.full((2,), 900.0), y, mask=mask)
            m(x, torch.full((2,), 950.0), y, mask=mask)
    return api(run)


def _second_thread(tmp_path):
    import threading
    torch, m, mgr, x, y, mask = _cached_small(dict(type="FORA"))
    opened, done, result = threading.Event(), threading.Event(), {}

    def owner():
        with mgr.session(num_steps=1):
            opened.set()
            done.wait(10)
    t = threading.Thread(target=owner)
    t.start()
    opened.wait(10)
    with torch.no_grad():
        result["r"] = api(lambda: m(x, torch.full((2,), 900.0), y, mask=mask))
    done.set()
    t.join(10)
    return result["r"]


def _bf16_equal_timesteps(tmp_path):
    torch, m, mgr, x, y, mask = _cached_small(dict(type="FORA", interval=3))
    m.to(torch.bfloat16)
    x, y = x.bfloat16(), y.bfloat16()
    ts = torch.tensor([1000.0 - 0.9 * i for i in range(9)]).bfloat16()
    with torch.no_grad():
        for i in range(9):
            out = m(x, ts[i].expand(2), y, mask=mask)
            x = (x.float() + out[:, :4].float() * 0.02).bfloat16()
    return "ok", f"runs={mgr.runs} labels={mgr.stats()['step_labels']}"


ROWS += [
    Row("cache-bf16-equal-timesteps-one-run", _bf16_equal_timesteps, "ok", r"runs=1 .*'reuse'"),
    Row("cache-nested-session", _nested_session, "RuntimeError", r"already open .*nested"),
    Row("cache-session-overrun", _session_overrun, "RuntimeError",
        r"session\(num_steps=2\) is over, but the model was called again \(call 3\)"),
    Row("cache-frozen-params-grad-input", _frozen_grad_input, "RuntimeError", r"torch\.no_grad"),
    Row("cache-session-names-passed-timestep", _session_names_passed_timestep, "RuntimeError",
        r"has timestep 950, not below the previous step's 900"),
    Row("cache-second-thread", _second_thread, "RuntimeError", r"from a second thread"),
    Row("demo-too-few-steps-for-the-policy",
        lambda p: tool(__import__("opensora_duca.cli.demo", fromlist=["main"]).main, DEMO_CFG,
                       "--num-sampling-steps", "2", "--save-dir", p / "out"), 2,
        r"needs at least \d+ sampling steps; the run has num_steps=2"),
]


@pytest.fixture
def no_build(monkeypatch):
    """Every tool refuses before it builds a model: building raises :class:`Built`."""
    import importlib

    def built(*a, **k):
        raise Built("the model was built before the error was found")
    for mod in ("frontier", "inference", "demo", "calibrate"):
        m = importlib.import_module(f"opensora_duca.cli.{mod}")
        if hasattr(m, "build_from_config"):
            monkeypatch.setattr(m, "build_from_config", built)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_row(row, tmp_path, no_build):
    code, message = row.call(tmp_path)
    assert code == row.code, (code, message)
    if isinstance(row.code, int) and row.code != 0:
        assert message.count("\n") <= 1, message  # one line
    assert re.search(row.pattern, message), message
    if row.files is not None:
        row.files(tmp_path)
