"""Checks of an inference config before anything is built (:mod:`opensora_duca.cli.inference`).

Every mistake a user can make in a config or on the command line is reported here, before a
model is built or a process group waits, as one ``ValueError`` naming the key, the value and
what is accepted: unknown top-level keys, counts and indices out of range, non-finite numbers,
the sampler's own option checks and its timesteps for the video (a frame count its timestep
transform refuses), the cache policy (top-level ``cache = dict(type=...)`` and the model
wrapper's ``model = dict(type="DuCa", model=..., cache=...)``: built, so every key and value is
checked, and refused with ``cfg_parallel=2`` when it couples the CFG halves), and video sizes
whose memory estimate cannot fit on this machine.

The size estimate is a lower bound of what a run holds at once, so nothing that could run is
refused: the decoded float32 video (``batch x 3 x T x H x W x 4`` bytes, on the device and
again on the CPU) and one hidden state of the model for the classifier-free-guidance batch
(``2 x batch x tokens x hidden_size x 4`` bytes; with ``cfg_parallel=2`` a rank holds one half
of that batch, ``batch x tokens x ...``) with, for STDiT3 models, the MLP's intermediate
activation beside it (``mlp_ratio`` times as large). The tokens are the real ones for a
weight-free codec (``DemoCodec``, ``identity``: built here, its latent size divided by the
model's patch; the demo codec gives 16 pixels per token) and otherwise at least 1024 pixels
per token (the strongest compression of a supported codec, 4 x 8 x 8, times the 1 x 2 x 2
patch); the hidden size and ``mlp_ratio`` come from the model's keys or its preset.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Any, Optional

import torch

from .cache.policies import build_policy
from .parallel.cfg import check_cache_policy, check_degree, check_world
from .parallel.launch import DEFAULT_TIMEOUT_S
from .pipeline import get_num_frames, resolve_dtype, resolve_image_size
from .registry import SCHEDULERS, VAES, build_module
from .utils.compile import check_available, compile_options

#: top-level keys of an inference config and what they hold
INFERENCE_KEYS = {
    "prompt": "a prompt or a list of prompts",
    "prompt_path": "a text file, one prompt per line",
    "image_size": "(H, W) in pixels",
    "resolution": "a resolution name such as '480p'",
    "aspect_ratio": "'H:W' such as '9:16'",
    "num_frames": "a frame count or a name such as '2s'",
    "fps": "fps conditioning of the model",
    "save_fps": "fps of the written files",
    "save_dir": "output folder",
    "sample_name": "file name prefix",
    "seed": "an int",
    "batch_size": "an int >= 1",
    "dtype": "fp32 | fp16 | bf16",
    "model": "dict(type=...)", "vae": "dict(type=...)", "text_encoder": "dict(type=...)",
    "scheduler": "dict(type=...)", "cache": "dict(type=...) or None",
    "aes": "aesthetic score appended to prompts", "flow": "motion score appended to prompts",
    "dist_timeout": "seconds a rank waits for the others",
    "compile": "None, True or dict(mode=..., backend=..., fullgraph=...) (torch.compile)",
    "cfg_parallel": "1, or 2: the guidance batch halves on two groups of ranks",
    "compare_caches": "tools/demo.py only: {run name: dict(type=...)} compared beside `cache` "
                      "(tools/inference.py runs `cache` alone)",
    # Open-Sora 1.2 keys kept so its configs load; they change nothing without reference
    # (image / video) conditioning, which this tool does not do
    "frame_interval": "Open-Sora key (no effect here)",
    "multi_resolution": "Open-Sora key (no effect here: height, width and fps are always "
                        "passed to the model)",
    "condition_frame_length": "Open-Sora key (no effect here)",
    "align": "Open-Sora key (no effect here)",
    "custom_imports": "mmengine imports",
}
#: the settings every rank must share (they decide what is generated)
AGREED_KEYS = ("prompt", "prompt_path", "image_size", "resolution", "aspect_ratio", "num_frames",
               "fps", "seed", "batch_size", "dtype", "model", "vae", "text_encoder", "scheduler",
               "cache", "aes", "flow", "compile", "cfg_parallel")
PIXELS_PER_TOKEN = 4 * 8 * 8 * 2 * 2


def _bad(key: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"{key}={value!r} is not accepted; accepted: {accepted}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: the longest ``dist_timeout`` accepted (seconds; about 115 days: datetime.timedelta and the
#: process group's millisecond counters overflow far above it)
MAX_DIST_TIMEOUT_S = 1e7


def dist_timeout(cfg: Any) -> float:
    """The config's ``dist_timeout`` in seconds (default 600), checked."""
    value = cfg.get("dist_timeout")
    if value is None:
        return DEFAULT_TIMEOUT_S
    if not _is_number(value) or not 0 < value <= MAX_DIST_TIMEOUT_S:
        raise _bad("dist_timeout", value, f"a number of seconds in (0, {MAX_DIST_TIMEOUT_S:g}] "
                                          f"(default 600)")
    return float(value)


def check_device(device: Any) -> torch.device:
    """``--device``: None (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``
    with a CUDA device N on this machine."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accepted = "cpu, cuda or cuda:N"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise _bad("--device", device, accepted) from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise _bad("--device", device, accepted)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise _bad("--device", device, "cpu (this machine has no usable CUDA device)")
    if dev.index is not None and dev.index >= count:
        raise _bad("--device", device, f"cpu, cuda or cuda:N with N < {count}")
    return dev


def check_compile(value: Any, device: torch.device) -> None:
    """The ``compile`` key: its options, a backend torch knows, and what the backend needs on
    this device (inductor on a CPU: a C++ compiler), before the model is built."""
    opts = compile_options(value)
    if opts is None:
        return
    try:
        check_available(opts, torch.device(device))
    except RuntimeError as err:
        raise ValueError(str(err)) from None
    from torch._dynamo import list_backends
    known = sorted(set(list_backends(exclude_tags=())) | {"inductor"})
    if opts.backend not in known:
        raise _bad("compile.backend", opts.backend, f"a torch.compile backend: {known}")


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def memory_bytes(device: torch.device) -> Optional[int]:
    """Memory of ``device`` (host RAM for the CPU), or None when it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_video_fits(num_frames: int, image_size: tuple[int, int], batch_size: int,
                     hidden_size: int, device_bytes: Optional[int], host_bytes: Optional[int],
                     device_type: str = "cpu", cfg_copies: int = 2,
                     tokens: Optional[int] = None, mlp_ratio: float = 0.0) -> None:
    """Refuse a video size whose lower-bound memory estimate exceeds the memory there is
    (``None``: unknown, not checked). ``cfg_copies``: samples of the guidance batch a rank
    runs per prompt (1 with ``cfg_parallel=2``). ``tokens``: the model's tokens per sample
    when known (the codec's real compression and the patch), else the lower bound of
    :data:`PIXELS_PER_TOKEN`; ``mlp_ratio`` > 0 adds the MLP's intermediate activation
    (``mlp_ratio`` x the hidden state), which exists beside the hidden state."""
    h, w = image_size
    pixels = num_frames * h * w
    video = batch_size * 3 * pixels * 4
    tokens = math.ceil(pixels / PIXELS_PER_TOKEN) if tokens is None else tokens
    hidden = cfg_copies * batch_size * tokens * hidden_size * 4 * (1 + mlp_ratio)
    size = f"num_frames={num_frames}, image_size=({h}, {w}), batch_size={batch_size}"
    for where, need, have, parts in (
            (device_type, video + hidden, device_bytes,
             f"decoded float32 video {_gib(video)} + one hidden state {_gib(hidden)}"),
            ("host", video, host_bytes, f"decoded float32 video {_gib(video)}")):
        if have is not None and need > have:
            raise ValueError(f"{size} cannot fit: it needs at least {_gib(need)} of {where} "
                             f"memory ({parts}) and the {where} has {_gib(have)}; accepted: a "
                             "smaller size, fewer frames or a smaller batch")


def cache_configs(cfg: Any) -> dict:
    """``{where: cache config}`` of the cache policies a run attaches: the top-level ``cache``
    and the model wrapper's (``model=dict(type="DuCa", ...)``, whose ``cache`` defaults to
    DuCa)."""
    out = {}
    if cfg.get("cache") is not None:
        out["cache"] = cfg.get("cache")
    model = cfg.get("model")
    if hasattr(model, "get") and model.get("type") == "DuCa":
        out["model.cache"] = dict(type="DuCa") if model.get("cache") is None else model["cache"]
    return out


def check_cache(cfg: Any, cfg_parallel: int) -> None:
    """Build every cache policy of ``cfg`` (a bad key or value fails with the policy's own
    message) and refuse one that couples the CFG halves with ``cfg_parallel=2``."""
    caches = cache_configs(cfg)
    if len(caches) > 1:
        raise ValueError("cache is set twice: a top-level cache=dict(type=...) and the model "
                         "wrapper's model=dict(type='DuCa', cache=...); accepted: one of them")
    for value in caches.values():
        policy = build_policy(value)
        if cfg_parallel == 2:
            check_cache_policy(policy)


def check_inference_config(cfg: Any, start_index: Any = None, end_index: Any = None,
                           device: Optional[torch.device] = None) -> None:
    """Check everything a run reads from ``cfg`` (an mmengine Config or a dict, after the
    command-line overrides) and the prompt range; raise one ValueError on the first mistake."""
    unknown = sorted(k for k in cfg.keys() if k not in INFERENCE_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"config keys {unknown} are not known; accepted: {sorted(INFERENCE_KEYS)}"
                         " (or names starting with '_' for helper variables)")
    for key in ("model", "vae", "text_encoder", "scheduler"):
        val = cfg.get(key)
        if not hasattr(val, "get") or "type" not in val:
            raise _bad(key, val, "dict(type=...) naming a registered type")
    cache = cfg.get("cache")
    if cache is not None and (not hasattr(cache, "get") or "type" not in cache):
        raise _bad("cache", cache, "dict(type=<a registered cache policy>, ...) or None")
    seed = cfg.get("seed", 0)
    if not _is_int(seed) or not 0 <= seed < 2 ** 63:  # seed + i seeds a torch.Generator
        raise _bad("seed", seed, "an int in [0, 2**63)")
    batch_size = cfg.get("batch_size") if cfg.get("batch_size") is not None else 1
    if not _is_int(batch_size) or batch_size < 1:
        raise _bad("batch_size", batch_size, "an int >= 1")
    for key, value, low in (("start_index", start_index, 0), ("end_index", end_index, 1)):
        if value is not None and (not _is_int(value) or value < low):
            raise _bad(key, value, f"an int >= {low}")
    if start_index is not None and end_index is not None and end_index <= start_index:
        raise _bad("end_index", end_index, f"an int > start_index={start_index}")
    for key in ("fps", "save_fps"):
        if cfg.get(key) is not None and (not _is_number(cfg[key]) or cfg[key] <= 0):
            raise _bad(key, cfg[key], "a positive finite number")
    sched = cfg["scheduler"]
    steps = sched.get("num_sampling_steps")
    if steps is not None and (not _is_int(steps) or steps < 1):
        raise _bad("scheduler.num_sampling_steps", steps, "an int >= 1")
    if sched.get("cfg_scale") is not None and not _is_number(sched["cfg_scale"]):
        raise _bad("scheduler.cfg_scale", sched["cfg_scale"], "a finite number")
    resolve_dtype(cfg.get("dtype", "fp32"))
    check_compile(cfg.get("compile"), torch.device("cpu") if device is None else device)
    dist_timeout(cfg)
    cfg_parallel = check_degree(cfg.get("cfg_parallel"))
    check_cache(cfg, cfg_parallel)
    check_world(cfg_parallel, int(os.environ.get("WORLD_SIZE", "1")))  # as launch reads it
    num_frames = get_num_frames(cfg.get("num_frames", 1))
    image_size = resolve_image_size(cfg.get("image_size"), cfg.get("resolution"),
                                    cfg.get("aspect_ratio"))
    # the sampler, built (cheap) for its own checks and its timesteps for this video: e.g. a
    # frame count whose timestep transform upstream turns into NaN is refused here
    scheduler = build_module(sched, SCHEDULERS)
    if hasattr(scheduler, "timesteps"):
        scheduler.timesteps(image_size[0], image_size[1], num_frames)
    device = torch.device("cpu") if device is None else torch.device(device)
    hidden, tokens, mlp_ratio = _model_size(cfg, num_frames, image_size)
    check_video_fits(num_frames, image_size, batch_size, hidden,
                     memory_bytes(device), memory_bytes(torch.device("cpu")), device.type,
                     cfg_copies=2 // cfg_parallel, tokens=tokens, mlp_ratio=mlp_ratio)


#: codecs without weights: built by the check to read their real compression
WEIGHT_FREE_CODECS = ("DemoCodec", "identity")


def _model_size(cfg: Any, num_frames: int, image_size: tuple) -> tuple:
    """(hidden_size, tokens per sample or None, mlp_ratio) of the config's model, from its keys
    or its preset (STDiT3 presets), and the tokens from a weight-free codec's latent size."""
    from .models.stdit3 import PRESETS

    model = cfg["model"]
    preset = PRESETS.get(model.get("type"), {})

    def get(key, default):
        val = model.get(key, preset.get(key, default))
        return default if val is None else val
    hidden = get("hidden_size", 1)
    hidden = hidden if _is_int(hidden) and hidden > 0 else 1
    mlp_ratio = get("mlp_ratio", 4.0) if preset or model.get("type") == "STDiT3" else 0.0
    mlp_ratio = float(mlp_ratio) if _is_number(mlp_ratio) and mlp_ratio > 0 else 0.0
    tokens = None
    vae = cfg.get("vae")
    if hasattr(vae, "get") and vae.get("type") in WEIGHT_FREE_CODECS:
        patch = get("patch_size", (1, 2, 2))
        try:
            latent = build_module(dict(vae), VAES).get_latent_size((num_frames, *image_size))
            tokens = math.prod(math.ceil(n / p) for n, p in zip(latent[-3:], patch))
        except (ValueError, TypeError, KeyError):
            tokens = None  # the codec refuses the size: reported where it is used
    return hidden, tokens, mlp_ratio


def run_settings(cfg: Any, start_index: Any = None, end_index: Any = None) -> dict:
    """The settings that decide what a run generates (for
    :func:`opensora_duca.parallel.agreement.check_ranks_agree`); a prompt file is represented
    by the sha256 of its bytes, so ranks reading different files disagree."""
    out = {k: cfg.get(k) for k in AGREED_KEYS}
    out.update(start_index=start_index, end_index=end_index)
    path = cfg.get("prompt_path")
    if cfg.get("prompt") is None and isinstance(path, str) and os.path.isfile(path):
        with open(path, "rb") as f:
            out["prompt_path"] = hashlib.sha256(f.read()).hexdigest()
    return out


__all__ = ["check_inference_config", "check_cache", "cache_configs", "check_video_fits",
           "check_device", "check_compile", "MAX_DIST_TIMEOUT_S",
           "dist_timeout", "memory_bytes", "run_settings", "INFERENCE_KEYS", "AGREED_KEYS"]


# ------------------------------------------------------------------------ Open-Sora 2.0
#: top-level keys of an Open-Sora 2.0 inference config (upstream's and this tool's)
V2_INFERENCE_KEYS = {
    "prompt": "a prompt or a list of prompts",
    "prompt_path": "a text file, one prompt per line",
    "save_dir": "output folder", "sample_name": "file name prefix",
    "seed": "an int (noise of prompt i: seed + i, unless sampling_option.seed is set)",
    "batch_size": "an int >= 1", "dtype": "fp32 | fp16 | bf16 (default bf16)",
    "cond_type": "t2v, i2v_head, i2v_tail, i2v_loop, v2v_head, v2v_tail, v2v_head_half, "
                 "v2v_tail_half",
    "ref": "reference image / video path(s) for i2v / v2v: one for every prompt, or a list "
           "matching prompt (';' between an i2v_loop's two)",
    "neg": "negative prompt (default '')",
    "sampling_option": "dict(...) of upstream's SamplingOption fields",
    "motion_score": "appended to prompts as ' {score} motion score.'",
    "fps_save": "fps of the prompt text and of the written files",
    "fps": "fps of the prompt text (the --fps flag; wins over fps_save)",
    "save_fps": "fps of the written files",
    "model": "dict(type=...)", "ae": "dict(type=...)", "t5": "dict(type=...)",
    "clip": "dict(type=...)", "cache": "dict(type=...) or None",
    "compile": "None, True or dict(mode=..., backend=..., fullgraph=...)",
    "patch_size": "the model's patch (default 2)",
    "ae_spatial_compression": "pixels per token edge (default 16)",
    "resolution": "alias of sampling_option.resolution",
    "aspect_ratio": "alias of sampling_option.aspect_ratio",
    "num_frames": "alias of sampling_option.num_frames",
    "num_steps": "alias of sampling_option.num_steps",
    "guidance": "alias of sampling_option.guidance",
    "guidance_img": "alias of sampling_option.guidance_img",
    "ckpt_path": "alias of model.from_pretrained",
    "image_size": "(H, W) in pixels (wins over resolution / aspect_ratio)",
    "dist_timeout": "seconds a rank waits for the others",
    "cfg_parallel": "1 (CFG parallelism is not available for 2.0)",
    "prompt_refine": "False only (upstream's LLM prompt refinement is not available)",
    "use_t2i2v": "False only (upstream's Flux text-to-image-to-video is not available)",
    "num_sample": "1 only",
    "dataset": "upstream key (not used: prompts come from prompt / prompt_path)",
    "plugin": "ColossalAI setting (not used)", "plugin_config": "ColossalAI setting (not used)",
    "plugin_ae": "ColossalAI setting (not used)",
    "plugin_config_ae": "ColossalAI setting (not used)",
    "offload_model": "upstream key (not used)",
    "custom_imports": "mmengine imports",
}


def _v2_prompts(cfg: Any) -> Optional[list]:
    prompts = cfg.get("prompt")
    if isinstance(prompts, str):
        return [prompts]
    return list(prompts) if isinstance(prompts, (list, tuple)) else None


def check_v2_references(cfg: Any, cond_type: str) -> None:
    """``ref`` of an i2v / v2v run: a path (or ``;``-joined paths) for every prompt, or a
    list matching the config's prompt list; every file must exist."""
    ref = cfg.get("ref")
    if cond_type == "t2v":
        if ref is not None:
            raise _bad("ref", ref, "None with cond_type='t2v' (references need an i2v / v2v "
                       "cond_type)")
        return
    prompts = _v2_prompts(cfg)
    if isinstance(ref, str):
        refs = [ref]
    elif isinstance(ref, (list, tuple)) and ref and all(isinstance(r, str) for r in ref):
        refs = list(ref)
        if prompts is None or len(prompts) != len(refs):
            raise _bad("ref", ref, f"one path per prompt of the config's prompt list "
                       f"({'no list' if prompts is None else len(prompts)}), or one path for "
                       f"every prompt")
        seen = {}
        for p, r in zip(prompts, refs):
            if seen.setdefault(p, r) != r:
                raise _bad("ref", ref, f"one reference per distinct prompt (prompt {p!r} is "
                           f"listed twice with different references)")
    else:
        raise _bad("ref", ref, f"a reference image / video path (or a list, one per prompt) "
                   f"for cond_type={cond_type!r}")
    for entry in refs:
        for path in entry.split(";"):
            if not os.path.isfile(path.strip()):
                raise _bad("ref", entry, "existing image / video files")


def v2_ae_layout(ae: Any) -> Optional[tuple[int, int, int]]:
    """(latent channels, temporal, spatial compression) of a known 2.0 AE config (all three
    are causal), or None for an unknown type."""
    import re
    typ = ae.get("type")
    if typ == "tiny_causal_vae":
        return 16, 4, 8
    if typ == "hunyuan_vae":
        return int(ae.get("latent_channels", 16)), int(ae.get("time_compression_ratio", 4)), \
            int(ae.get("spatial_compression_ratio", 8))
    if typ == "dc_ae":
        m = re.fullmatch(r"dc-ae-f(\d+)t(\d+)c(\d+)", str(ae.get("model_name")))
        if m:
            return int(m.group(3)), int(m.group(2)), int(m.group(1))
    return None


def check_v2_ae(cfg: Any, settings: dict) -> None:
    """The sampling options and the model's ``in_channels`` against a known AE's latent
    layout (:func:`v2_ae_layout`), before anything is built."""
    layout = v2_ae_layout(cfg["ae"])
    if layout is None:
        return
    channels, temporal, spatial = layout
    sampler, patch = settings["sampler"], settings["patch_size"]
    kind = cfg["ae"]["type"]
    if sampler["temporal_reduction"] != temporal or sampler["is_causal_vae"] is not True:
        raise ValueError(
            f"sampling_option temporal_reduction={sampler['temporal_reduction']!r}, "
            f"is_causal_vae={sampler['is_causal_vae']!r} do not describe ae {kind!r}; "
            f"accepted: temporal_reduction={temporal}, is_causal_vae=True")
    if settings["spatial_compression"] != spatial * patch:
        raise _bad("ae_spatial_compression", settings["spatial_compression"],
                   f"{spatial * patch} (ae {kind!r}: {spatial} px per latent pixel, times "
                   f"patch_size={patch})")
    model = cfg["model"]
    if model.get("type") == "DuCa" and hasattr(model.get("model"), "get"):
        model = model["model"]
    in_channels = model.get("in_channels")
    if in_channels is None:
        in_channels = {"OpenSora-v2-MMDiT": 64, "MMDiT-cpu": 64}.get(model.get("type"))
    if _is_int(in_channels) and in_channels != channels * patch * patch:
        raise _bad("model.in_channels", in_channels, f"{channels * patch * patch} (ae "
                   f"{kind!r}: {channels} channels, times patch_size^2 = {patch * patch})")


def check_v2_paths(cfg: Any) -> None:
    """Every local weights path of a 2.0 config exists (nothing is downloaded): the model's
    (or the DuCa wrapper's inner model's) and the AE's ``from_pretrained`` when set, and the
    ``text_embedder`` folders of ``t5`` and ``clip``."""
    model = cfg["model"]
    if model.get("type") == "DuCa" and hasattr(model.get("model"), "get"):
        path = model.get("from_pretrained") or model["model"].get("from_pretrained")
    else:
        path = model.get("from_pretrained")
    entries = [("model.from_pretrained", path, os.path.exists, "an existing local file or "
                "folder (e.g. Open_Sora_v2.safetensors)"),
               ("ae.from_pretrained", cfg["ae"].get("from_pretrained"), os.path.exists,
                "an existing local file")]
    for key in ("t5", "clip"):
        if cfg[key].get("type") == "text_embedder":
            entries.append((f"{key}.from_pretrained", cfg[key].get("from_pretrained", ""),
                            os.path.isdir, "an existing local folder"))
    for key, value, exists, accepted in entries:
        if value is not None and not (isinstance(value, str) and exists(value)):
            raise _bad(key, value, f"{accepted}; the weights must be downloaded first, nothing "
                       f"is downloaded here")


def check_v2_inference_config(cfg: Any, start_index: Any = None, end_index: Any = None,
                              device: Optional[torch.device] = None) -> None:
    """:func:`check_inference_config` for an Open-Sora 2.0 config
    (:func:`opensora_duca.pipeline_v2.is_v2_config`): every key and value a run reads, checked
    without building anything; one ValueError on the first mistake."""
    from .pipeline_v2 import sampling_settings
    from .schedulers.opensora2 import OpenSora2Sampler

    unknown = sorted(k for k in cfg.keys() if k not in V2_INFERENCE_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"config keys {unknown} are not known in an Open-Sora 2.0 config; "
                         f"accepted: {sorted(V2_INFERENCE_KEYS)} (or names starting with '_')")
    for key in ("model", "ae", "t5", "clip"):
        val = cfg.get(key)
        if not hasattr(val, "get") or "type" not in val:
            raise _bad(key, val, "dict(type=...) naming a registered type")
    cache = cfg.get("cache")
    if cache is not None and (not hasattr(cache, "get") or "type" not in cache):
        raise _bad("cache", cache, "dict(type=<a registered cache policy>, ...) or None")
    for key, accepted in (("prompt_refine", False), ("use_t2i2v", False)):
        if cfg.get(key) not in (None, accepted):
            raise _bad(key, cfg.get(key), f"{accepted} or unset ({V2_INFERENCE_KEYS[key]})")
    if cfg.get("num_sample") not in (None, 1):
        raise _bad("num_sample", cfg.get("num_sample"), "1 (one video per prompt; give more "
                   "prompts or seeds instead)")
    if cfg.get("cfg_parallel") not in (None, 1):
        raise _bad("cfg_parallel", cfg.get("cfg_parallel"), "1 (the three-branch guidance "
                   "batch of Open-Sora 2.0 does not split into two CFG halves)")
    batch_size = cfg.get("batch_size") if cfg.get("batch_size") is not None else 1
    if not _is_int(batch_size) or batch_size < 1:
        raise _bad("batch_size", batch_size, "an int >= 1")
    seed = cfg.get("seed", 0)
    if not _is_int(seed) or not 0 <= seed < 2 ** 63:  # seed + i seeds a torch.Generator
        raise _bad("seed", seed, "an int in [0, 2**63)")
    for key, value, low in (("start_index", start_index, 0), ("end_index", end_index, 1)):
        if value is not None and (not _is_int(value) or value < low):
            raise _bad(key, value, f"an int >= {low}")
    if start_index is not None and end_index is not None and end_index <= start_index:
        raise _bad("end_index", end_index, f"an int > start_index={start_index}")
    for key in ("fps_save", "fps", "save_fps"):
        if cfg.get(key) is not None and (not _is_number(cfg[key]) or cfg[key] <= 0):
            raise _bad(key, cfg[key], "a positive finite number")
    resolve_dtype(cfg.get("dtype", "bf16"))
    compile_options(cfg.get("compile"))
    dist_timeout(cfg)
    check_cache(cfg, 1)
    settings = sampling_settings(cfg)
    check_v2_ae(cfg, settings)
    check_v2_paths(cfg)
    check_v2_references(cfg, settings["cond_type"])
    cond_type, sampler = settings["cond_type"], settings["sampler"]
    if cond_type.startswith("v2v"):
        from .schedulers.opensora2 import condition_frames, latent_frames
        k = condition_frames(cond_type, sampler["is_causal_vae"])
        have = latent_frames(settings["num_frames"], sampler["temporal_reduction"],
                             sampler["is_causal_vae"])
        if have < k:
            raise ValueError(f"cond_type={cond_type!r} gives {k} latent frames and "
                             f"num_frames={settings['num_frames']} has {have}; accepted: "
                             f"num_frames with at least {k} latent frames")
    device = torch.device("cpu") if device is None else torch.device(device)
    model = cfg["model"]
    if model.get("type") == "DuCa" and hasattr(model.get("model"), "get"):
        model = model["model"]
    hidden = model.get("hidden_size")
    if hidden is None:
        hidden = {"flux": 3072, "OpenSora-v2-MMDiT": 3072, "MMDiT-cpu": 64}.get(
            model.get("type"), 1)
    cond_embed = model.get("cond_embed")
    if cond_embed is None:
        cond_embed = model.get("type") in ("OpenSora-v2-MMDiT", "MMDiT-cpu")
    if settings["sampler"]["method"] == "distill" and cond_embed is True:
        raise ValueError("sampling_option.method='distill' runs the model without a visual "
                         "condition and this model has cond_embed=True (it needs one, as "
                         "upstream's); accepted: method='i2v', or a model with cond_embed=False")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # as launch reads it
    heads = model.get("num_heads")
    if heads is None:
        heads = {"OpenSora-v2-MMDiT": 24, "MMDiT-cpu": 4}.get(model.get("type"))
    if world > 1 and _is_int(heads) and heads % world:
        raise ValueError(f"{world} ranks do not divide the model's num_heads={heads} (the "
                         f"sequence-parallel attention splits the heads over the ranks); "
                         f"accepted: a rank count that divides {heads}")
    branches = OpenSora2Sampler(**settings["sampler"]).branches
    check_video_fits(settings["num_frames"], (settings["height"], settings["width"]),
                     batch_size, hidden if _is_int(hidden) else 1, memory_bytes(device),
                     memory_bytes(torch.device("cpu")), device.type, cfg_copies=branches)


#: the settings of a 2.0 run every rank must share, beside :data:`AGREED_KEYS`
V2_AGREED_KEYS = ("sampling_option", "ae", "t5", "clip", "cond_type", "ref", "neg",
                  "motion_score", "fps_save", "patch_size", "ae_spatial_compression", "num_steps",
                  "guidance", "guidance_img")


def v2_run_settings(cfg: Any, start_index: Any = None, end_index: Any = None) -> dict:
    """:func:`run_settings` plus the keys of :data:`V2_AGREED_KEYS`."""
    out = run_settings(cfg, start_index, end_index)
    out.update({k: cfg.get(k) for k in V2_AGREED_KEYS})
    return out


__all__ += ["check_v2_inference_config", "check_v2_references", "check_v2_ae", "v2_ae_layout",
            "check_v2_paths",
            "v2_run_settings",
            "V2_INFERENCE_KEYS", "V2_AGREED_KEYS"]
