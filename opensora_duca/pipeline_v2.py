"""Open-Sora 2.0 generation: prompts -> T5 / CLIP -> MMDiT + flow-matching sampler -> AE.

::

    cfg = mmengine.Config.fromfile("configs/opensora-v2/inference/tiny.py")
    pipe = build_v2_from_config(cfg, device="cpu")
    out = pipe.generate(["a red circle moving left"], seeds=[42])
    out["video"]      # float32 [B, 3, T, H, W] in [-1, 1], on the CPU
    out["latents"]    # float32 [B, C, t, h, w] (the unpacked latent before decoding)

Config keys (upstream Open-Sora 2.0's, ``configs/diffusion/inference/256px.py``):
``model`` (``dict(type="flux", ...)`` or a preset of :data:`opensora_duca.registry.MODELS`,
or the wrapper ``dict(type="DuCa", model=..., cache=...)``), ``ae`` (``hunyuan_vae``,
``dc_ae`` or ``tiny_causal_vae``), ``t5`` and ``clip`` (``text_embedder`` from local folders,
or ``hashed_text_embedder``), ``sampling_option`` (upstream's ``SamplingOption`` fields:
resolution + aspect_ratio or height + width, num_frames, num_steps, guidance, guidance_img,
text_osci, image_osci, scale_temporal_osci, shift, flow_shift, method, temporal_reduction,
is_causal_vae, seed), ``cond_type``, ``motion_score``, ``fps_save``, ``patch_size`` (default
2), ``ae_spatial_compression`` (pixels per token edge, default 16), ``dtype`` (default bf16,
as upstream), ``seed``, ``batch_size``, ``save_dir``, and upstream's top-level aliases
``resolution``, ``aspect_ratio``, ``num_frames``, ``num_steps``, ``guidance``,
``guidance_img``, ``ckpt_path`` (they override ``sampling_option``, as upstream's
``parse_alias``) plus ``image_size = (H, W)``. Added here: ``cache = dict(type=...)``
(attached with :func:`opensora_duca.cache.apply_cache`), ``compile``, ``neg`` (the negative
prompt, default ``""``), ``ref`` (reference image / video paths for i2v / v2v, one per
prompt, ``;`` between a loop's two). Accepted and not used: ``dataset``, ColossalAI's
``plugin`` / ``plugin_config`` / ``plugin_ae`` / ``plugin_config_ae``, ``offload_model``.
Refused (one-line errors, before anything is built): ``prompt_refine=True`` and
``motion_score="dynamic"`` (they call an LLM API), ``use_t2i2v=True`` (the Flux image
model), ``num_sample`` other than 1 and ``cfg_parallel=2``. Under torchrun every rank runs the
same prompts and the MMDiT shards the image tokens over the ranks (its Ulysses sequence
parallelism, ``enable_sequence_parallelism``; the rank count must divide ``num_heads``).

What a run does, as upstream's ``prepare_api``: the prompt gets `` {fps} FPS.`` (after a
period) and `` {motion_score} motion score.``; the video size is upstream's
``get_image_size`` (:func:`image_size_v2`) rounded up to multiples of 16; the noise
(:func:`opensora_duca.schedulers.opensora2.get_noise`) is seeded per prompt with
``seed + i`` (``seed``: ``sampling_option.seed`` when set, else the top-level ``seed``); the
sampler (:class:`opensora_duca.schedulers.opensora2.OpenSora2Sampler`) runs the three-branch
guidance batch (prompt, negative, negative) with the condition of ``cond_type``; the latent is
unpacked, the given i2v frames are put back from the reference latents, the AE decodes and the
video is cut to ``num_frames`` (and, with a non-causal AE, the padding frames of i2v removed).
Upstream puts the reference frames back into sample 0 of a batch only; here every sample gets
its own (the same for upstream's batch size 1).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Optional, Sequence

import torch

from .cache import apply_cache, get_cache_manager, remove_cache
from .cache.policies import build_policy
from .registry import MODELS, TEXT_ENCODERS, VAES, build_module
from .schedulers import opensora2 as s2
from .utils.compile import compile_options
from .utils.config import plain
from .utils.dtype import resolve_dtype

#: upstream's SamplingOption fields
SAMPLING_KEYS = ("width", "height", "resolution", "aspect_ratio", "num_frames", "num_steps",
                 "guidance", "text_osci", "guidance_img", "image_osci", "scale_temporal_osci",
                 "seed", "shift", "method", "temporal_reduction", "is_causal_vae", "flow_shift")
#: the SamplingOption fields that configure the sampler (the others set the video)
SAMPLER_KEYS = ("num_steps", "guidance", "guidance_img", "text_osci", "image_osci",
                "scale_temporal_osci", "shift", "flow_shift", "method", "temporal_reduction",
                "is_causal_vae")
#: upstream's top-level aliases of sampling_option fields (its parse_alias)
ALIASES = ("resolution", "aspect_ratio", "num_frames", "num_steps", "guidance", "guidance_img")
#: upstream's SamplingOption defaults
SAMPLING_DEFAULTS = dict(width=None, height=None, resolution=None, aspect_ratio=None,
                         num_frames=1, num_steps=50, guidance=4.0, text_osci=False,
                         guidance_img=None, image_osci=False, scale_temporal_osci=False,
                         seed=None, shift=True, method="i2v", temporal_reduction=1,
                         is_causal_vae=False, flow_shift=None)
#: upstream's aspect ratios (width:height), in its order
ASPECT_RATIOS = ("2.39:1", "2:1", "16:9", "1.85:1", "9:16", "5:8", "3:2", "4:3", "1:1")
#: model types that mark a config as Open-Sora 2.0's
V2_MODEL_TYPES = ("flux", "OpenSora-v2-MMDiT", "MMDiT-cpu")


# --------------------------------------------------------------------------- sizes
def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _as_dict(value: Any) -> Any:
    value = plain(value)
    return dict(value) if isinstance(value, dict) else value


def is_v2_config(cfg: Any) -> bool:
    """True for an Open-Sora 2.0 config: it has ``sampling_option``, or its model (or the
    DuCa wrapper's inner model) is a 2.0 type."""
    if _get(cfg, "sampling_option") is not None:
        return True
    model = _as_dict(_get(cfg, "model"))
    if isinstance(model, dict) and model.get("type") == "DuCa":
        model = _as_dict(model.get("model"))
    return isinstance(model, dict) and model.get("type") in V2_MODEL_TYPES


def pixels_of(resolution: Any) -> int:
    """Pixels of an upstream resolution name: ``"256px"`` -> 256^2, ``"720p"`` -> 720^2 16 / 9
    (a ``_setting`` suffix is dropped, as upstream)."""
    name = resolution.split("_")[0] if isinstance(resolution, str) else None
    try:
        if name.endswith("px"):
            return int(name[:-2]) ** 2
        if name.endswith("p"):
            return int(int(name[:-1]) ** 2 / 9 * 16)
    except (AttributeError, ValueError):
        pass
    raise ValueError(f"resolution={resolution!r} is not accepted; accepted: a name such as "
                     f"'256px', '768px' or '720p'")


def aspect_ratio_sizes(total_pixels: int, spatial_compression: int = 16) -> dict:
    """{aspect ratio (width:height): (H, W)} as upstream's inference table: for each ratio,
    W = floor(sqrt(P w / h) / D) D and H = floor(P / W / D) D; the reversed ratio gets
    (W, H), and those reversed entries win where a ratio appears both ways."""
    d = spatial_compression
    sizes, reversed_sizes = {}, {}
    for ratio in ASPECT_RATIOS:
        rw, rh = (float(v) for v in ratio.split(":"))
        width = int(math.sqrt(total_pixels * (rw / rh)) // d) * d
        height = int((total_pixels / width) // d) * d
        sizes[ratio] = (height, width)
        reversed_sizes[":".join(ratio.split(":")[::-1])] = (width, height)
    sizes.update(reversed_sizes)
    return sizes


def image_size_v2(resolution: Any, aspect_ratio: Any, spatial_compression: int = 16
                  ) -> tuple[int, int]:
    """(H, W) of upstream's ``get_image_size(resolution, aspect_ratio, training=False)``."""
    sizes = aspect_ratio_sizes(pixels_of(resolution), spatial_compression)
    if aspect_ratio not in sizes:
        raise ValueError(f"aspect_ratio={aspect_ratio!r} is not accepted; accepted: one of "
                         f"{sorted(sizes)} (width:height)")
    return sizes[aspect_ratio]


def round_up16(v: int) -> int:
    return (v // 16 + (1 if v % 16 else 0)) * 16


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def sampling_settings(cfg: Any) -> dict:
    """The run's settings from a 2.0 config, checked (one ValueError per mistake): ``sampler``
    (the sampler's keywords), ``height`` / ``width`` (rounded up to 16), ``num_frames``,
    ``seed`` (of prompt 0), ``cond_type``, ``patch_size``, ``spatial_compression``, ``fps``
    (of the prompt text), ``motion_score``, ``neg``. Nothing is built."""
    so = _as_dict(_get(cfg, "sampling_option"))
    if so is None:
        so = {}
    if not isinstance(so, dict):
        raise ValueError(f"sampling_option={so!r} is not accepted; accepted: dict(...) of "
                         f"{list(SAMPLING_KEYS)}")
    unknown = sorted(set(so) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"sampling_option keys {unknown} are not known; accepted: "
                         f"{list(SAMPLING_KEYS)}")
    opt = dict(SAMPLING_DEFAULTS, **so)
    for key in ALIASES:  # upstream's parse_alias: the top-level key wins
        if _get(cfg, key) is not None:
            opt[key] = _get(cfg, key)
    patch = _get(cfg, "patch_size", 2)
    if not _is_int(patch, 1):
        raise ValueError(f"patch_size={patch!r} is not accepted; accepted: an int >= 1")
    comp = _get(cfg, "ae_spatial_compression", 16)
    if not _is_int(comp, 1):
        raise ValueError(f"ae_spatial_compression={comp!r} is not accepted; accepted: an int "
                         f">= 1 (pixels per token edge: 16 for hunyuan_vae, 32 for dc_ae)")
    image_size = _get(cfg, "image_size")
    if image_size is not None:
        ok = isinstance(image_size, (list, tuple)) and len(image_size) == 2 and all(
            _is_int(v, 1) for v in image_size)
        if not ok:
            raise ValueError(f"image_size={image_size!r} is not accepted; accepted: (H, W), "
                             f"two positive ints")
        height, width = image_size
    elif opt["resolution"] is not None or opt["aspect_ratio"] is not None:
        if opt["resolution"] is None or opt["aspect_ratio"] is None:
            raise ValueError("sampling_option: resolution and aspect_ratio go together; got "
                             f"resolution={opt['resolution']!r}, "
                             f"aspect_ratio={opt['aspect_ratio']!r}")
        height, width = image_size_v2(opt["resolution"], opt["aspect_ratio"], comp)
    else:
        height, width = opt["height"], opt["width"]
        if not _is_int(height, 1) or not _is_int(width, 1):
            raise ValueError(f"the video size is not set: sampling_option height={height!r}, "
                             f"width={width!r}; accepted: resolution + aspect_ratio, height + "
                             f"width (ints >= 1) or image_size=(H, W)")
    num_frames = opt["num_frames"]
    if not _is_int(num_frames, 1):
        raise ValueError(f"num_frames={num_frames!r} is not accepted; accepted: an int >= 1")
    sampler = {k: opt[k] for k in SAMPLER_KEYS}
    sampler["patch_size"] = patch
    s2.OpenSora2Sampler(**sampler)  # its own checks
    seed = opt["seed"] if opt["seed"] is not None else _get(cfg, "seed", 0)
    if not _is_int(seed, 0):
        raise ValueError(f"seed={seed!r} is not accepted; accepted: an int >= 0")
    cond_type = s2.check_cond_type(_get(cfg, "cond_type", "t2v"))
    if cond_type != "t2v" and opt["method"] != "i2v":
        raise ValueError(f"cond_type={cond_type!r} needs sampling_option.method='i2v' (the "
                         f"distilled method has no image condition); accepted: cond_type='t2v'")
    fps_key = "fps" if _get(cfg, "fps") is not None else "fps_save"
    fps = _get(cfg, fps_key, 16)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"{fps_key}={fps!r} is not accepted; accepted: a number > 0")
    motion = _get(cfg, "motion_score")
    if motion == "dynamic":
        raise ValueError("motion_score='dynamic' is not accepted (upstream asks an LLM API for "
                         "it); accepted: a score such as 4 or '4', or no motion_score")
    if motion is not None and (isinstance(motion, bool) or not isinstance(motion, (int, float,
                                                                                    str))):
        raise ValueError(f"motion_score={motion!r} is not accepted; accepted: a number or a "
                         f"string such as '4'")
    neg = _get(cfg, "neg")
    if neg is not None and not isinstance(neg, str):
        raise ValueError(f"neg={neg!r} is not accepted; accepted: a negative prompt (str)")
    return dict(sampler=sampler, height=round_up16(height), width=round_up16(width),
                num_frames=num_frames, seed=seed, cond_type=cond_type, patch_size=patch,
                spatial_compression=comp, fps=fps, motion_score=motion,
                neg="" if neg is None else neg)


# --------------------------------------------------------------------------- prompts
def prompt_text(prompts: Sequence[str], fps: Any = 16, motion_score: Any = None) -> list[str]:
    """Upstream's prompt suffixes: a final period, `` {fps} FPS.`` (unless the prompt already
    ends that way) and, with a motion score, `` {score} motion score.``"""
    import re
    out = []
    for p in prompts:
        p = p.strip()
        if not p.endswith("."):
            p += "."
        if not re.search(r"\d+ FPS\.$", p):
            p = f"{p} {fps} FPS."
        if motion_score is not None:
            p = f"{p} {motion_score} motion score."
        out.append(p)
    return out


# ------------------------------------------------------------------------ references
def resize_crop(image, size: tuple[int, int]):
    """A PIL image resized (bicubic) to cover ``size`` = (H, W) and centre-cropped to it, as
    upstream's ``resize_crop_to_fill``."""
    import numpy as np
    from PIL import Image
    w, h = image.size
    th, tw = size
    rh, rw = th / h, tw / w
    if rh > rw:
        sh, sw = th, round(w * rh)
        i, j = 0, int(round((sw - tw) / 2.0))
    else:
        sh, sw = round(h * rw), tw
        i, j = int(round((sh - th) / 2.0)), 0
    arr = np.array(image.resize((sw, sh), Image.BICUBIC))
    return arr[i:i + th, j:j + tw]


def load_reference(path: str, size: tuple[int, int]) -> torch.Tensor:
    """An image or video file -> pixels [3, F, H, W] in [-1, 1], each frame resized and
    cropped to ``size`` by :func:`resize_crop`."""
    import numpy as np
    from PIL import Image
    if not isinstance(path, str) or not os.path.isfile(path):
        raise FileNotFoundError(f"reference {path!r} is not an existing file; accepted: an "
                                f"image or a video file")
    if os.path.splitext(path)[1].lower() in (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif"):
        from .utils.video import read_video
        frames = [resize_crop(Image.fromarray(f), size) for f in read_video(path)]
    else:
        with Image.open(path) as im:
            frames = [resize_crop(im.convert("RGB"), size)]
    x = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float()
    return x / 127.5 - 1


def select_reference_frames(cond_type: str, videos: Sequence[torch.Tensor],
                            causal: bool = True) -> list[torch.Tensor]:
    """The pixel frames upstream encodes for a condition type from a prompt's references
    (``videos``: one or more [3, F, H, W]): i2v_head: the first frame of the first; i2v_tail:
    the last frame of the last; i2v_loop: both; v2v_head / _tail: the first / last
    ``32 + causal`` frames (``64 + causal`` for the half types) of the first."""
    cond_type = s2.check_cond_type(cond_type)
    if cond_type.startswith("v2v"):
        need = s2.reference_pixel_frames(cond_type, causal)
        v = videos[0]
        if v.shape[1] < need:
            raise ValueError(f"cond_type={cond_type!r} needs a reference video of at least "
                             f"{need} frames; got {v.shape[1]}")
        return [v[:, :need] if "head" in cond_type else v[:, -need:]]
    out = []
    if cond_type in ("i2v_head", "i2v_loop"):
        out.append(videos[0][:, :1])
    if cond_type in ("i2v_tail", "i2v_loop"):
        out.append(videos[-1][:, -1:])
    return out


# -------------------------------------------------------------------------- pipeline
class PipelineV2:
    """T5 + CLIP + MMDiT + AE + :class:`~opensora_duca.schedulers.opensora2.OpenSora2Sampler`
    (+ optional cache manager); build it with :func:`build_v2_from_config`. ``defaults``:
    the config's video size, frames, seed, batch size, condition type and prompt settings."""

    cfg_parallel = None  # the tools' summary reads it (no CFG parallelism for 2.0)

    def __init__(self, model, ae, t5, clip, scheduler, device, dtype, cache_manager=None,
                 defaults: Optional[dict] = None):
        self.model, self.vae, self.t5, self.clip = model, ae, t5, clip
        self.scheduler = scheduler
        self.device, self.dtype = torch.device(device), dtype
        self.cache_manager = cache_manager
        self.defaults = dict(defaults or {})

    @property
    def spatial_compression(self) -> int:
        return self.defaults.get("spatial_compression", 16)

    def latent_size(self, num_frames: int, height: int, width: int) -> list[int]:
        """[t, h, w] of the (unpacked) latent the sampler moves."""
        shape = s2.noise_shape(1, height, width, self.scheduler.latent_frames(num_frames),
                               self.scheduler.patch_size, 1, self.spatial_compression)
        return list(shape[2:])

    def check_video(self, num_frames: int, height: int, width: int) -> None:
        """Refuse a size whose latent differs from the AE's (a config whose sampling_option
        does not describe its AE: temporal_reduction, is_causal_vae, ae_spatial_compression,
        patch_size)."""
        if not hasattr(self.vae, "get_latent_size"):
            return
        want = self.latent_size(num_frames, height, width)
        got = list(self.vae.get_latent_size((num_frames, height, width)))
        if got != want:
            raise ValueError(
                f"the AE gives a latent of {got} (frames, h, w) for {num_frames} frames of "
                f"{height} x {width} and the sampler expects {want}; accepted: "
                f"sampling_option.temporal_reduction / is_causal_vae and ae_spatial_compression "
                f"/ patch_size that match the AE")

    @torch.no_grad()
    def encode_text(self, texts: list[str], added_tokens: int) -> tuple[torch.Tensor, ...]:
        txt = self.t5(texts, added_tokens=added_tokens, seq_align=1)
        vec = self.clip(texts)
        return txt.to(self.device, self.dtype), vec.to(self.device, self.dtype)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Optional[Sequence[int]] = None,
                 seed: Optional[int] = None, batch_size: Optional[int] = None,
                 num_frames: Optional[int] = None, image_size: Optional[tuple] = None,
                 cond_type: Optional[str] = None, references: Optional[Sequence] = None,
                 neg: Optional[str] = None, progress: bool = False) -> dict:
        """Generate one video per prompt (module docstring). ``seeds[j]`` (default
        ``seed + j``, ``seed`` from the config) seeds prompt ``j``'s noise. ``references``
        (i2v / v2v): one entry per prompt, a pixel video [3, F, H, W] in [-1, 1] (an image:
        F = 1) or a list of them (i2v_loop: the first's first frame, the last's last), or a
        path / ``;``-separated paths (:func:`load_reference`)."""
        d = self.defaults
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts={prompts!r} is not accepted; accepted: a non-empty "
                             f"list of strings")
        num_frames = d["num_frames"] if num_frames is None else num_frames
        height, width = d["image_size"] if image_size is None else image_size
        height, width = round_up16(height), round_up16(width)
        seed = d["seed"] if seed is None else seed
        seeds = [seed + j for j in range(len(prompts))] if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        batch_size = batch_size or d.get("batch_size") or 1
        cond_type = s2.check_cond_type(d.get("cond_type") if cond_type is None else cond_type)
        neg = d.get("neg", "") if neg is None else neg
        if not _is_int(num_frames, 1):
            raise ValueError(f"num_frames={num_frames!r} is not accepted; accepted: an int >= 1")
        if cond_type != "t2v" and self.scheduler.method != "i2v":
            raise ValueError(f"cond_type={cond_type!r} needs sampling_option.method='i2v' (the "
                             f"distilled method has no image condition); accepted: 't2v'")
        self.check_video(num_frames, height, width)
        if references is None and cond_type != "t2v":
            references = self.config_references(prompts)
        refs = self._references(cond_type, references, len(prompts), (height, width))
        timings = dict(text_s=0.0, encode_s=0.0, sample_s=0.0, decode_s=0.0)
        t_all = time.perf_counter()
        texts = prompt_text(prompts, d.get("fps", 16), d.get("motion_score"))
        videos, latents = [], []
        for b0 in range(0, len(prompts), batch_size):
            sl = slice(b0, b0 + batch_size)
            z, v = self._batch(texts[sl], seeds[sl], num_frames, height, width, cond_type,
                               None if refs is None else refs[sl], neg, progress, timings)
            latents.append(z)
            videos.append(v)
        timings["total_s"] = time.perf_counter() - t_all
        return dict(video=torch.cat(videos), latents=torch.cat(latents), prompts=texts,
                    seeds=seeds, timings=timings, num_frames=num_frames,
                    image_size=(height, width),
                    latent_size=self.latent_size(num_frames, height, width),
                    fps=d.get("fps", 16), cond_type=cond_type)

    def config_references(self, prompts: Sequence[str]) -> Optional[list]:
        """The config's ``ref`` for ``prompts``: a path for every prompt, or the path listed
        beside the prompt in the config's prompt list; None without ``ref``."""
        ref, listed = self.defaults.get("ref"), self.defaults.get("prompts")
        if ref is None:
            return None
        if isinstance(ref, str):
            return [ref] * len(prompts)
        by_prompt = dict(zip(listed or [], ref))
        missing = [p for p in prompts if p not in by_prompt]
        if missing:
            raise ValueError(f"ref: no reference for the prompt(s) {missing}; accepted: a ref "
                             f"list matching the config's prompt list, or one ref for all")
        return [by_prompt[p] for p in prompts]

    def _references(self, cond_type, references, n, size):
        if cond_type == "t2v":
            if references is not None:
                raise ValueError("references given with cond_type='t2v'; accepted: an i2v / "
                                 "v2v cond_type with references, or none")
            return None
        if not isinstance(references, (list, tuple)) or len(references) != n:
            raise ValueError(f"cond_type={cond_type!r} needs references, one per prompt ({n}); "
                             f"got {references!r:.80}; accepted: image / video paths (config "
                             f"key ref) or pixel tensors [3, F, H, W]")
        out = []
        for j, entry in enumerate(references):
            if isinstance(entry, str):
                entry = [load_reference(p.strip(), size) for p in entry.split(";")]
            entry = list(entry) if isinstance(entry, (list, tuple)) else [entry]
            for r in entry:
                if not isinstance(r, torch.Tensor) or r.dim() != 4 or r.shape[0] != 3 or \
                        tuple(r.shape[2:]) != tuple(size):
                    got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
                    raise ValueError(f"references[{j}]: {got} is not accepted; accepted: "
                                     f"pixels [3, F, {size[0]}, {size[1]}]")
            out.append(select_reference_frames(cond_type, entry, self.scheduler.is_causal_vae))
        return out

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _batch(self, texts, seeds, num_frames, height, width, cond_type, refs, neg, progress,
               timings):
        sampler, p, comp = self.scheduler, self.scheduler.patch_size, self.spatial_compression
        b = len(texts)
        frames = sampler.latent_frames(num_frames)
        channels = self.vae.out_channels
        z = s2.get_noise(seeds, height, width, frames, self.device, self.dtype, p, channels,
                         comp)
        h_tok, w_tok = z.shape[-2] // p, z.shape[-1] // p
        rows = sampler.branches * b
        t0 = time.perf_counter()
        all_texts = list(texts) + ([neg] * (2 * b) if sampler.branches == 3 else [])
        txt, y_vec = self.encode_text(all_texts, frames * h_tok * w_tok)
        img_ids, txt_ids = s2.prepare_ids(rows, frames, h_tok, w_tok, txt.shape[1],
                                          self.device, self.dtype)
        self._sync()
        timings["text_s"] += time.perf_counter() - t0

        lat_refs = None
        masks = masked_ref = None
        if sampler.branches == 3:
            if refs is not None:
                t0 = time.perf_counter()
                lat_refs = [[self.vae.encode(r[None].to(self.device, self.vae.dtype))[0]
                             for r in entry] for entry in refs]
                self._sync()
                timings["encode_s"] += time.perf_counter() - t0
            masks, masked_ref = s2.prepare_condition(
                z.shape, cond_type, lat_refs, causal=sampler.is_causal_vae,
                device=self.device, dtype=self.dtype)
        timesteps = sampler.timesteps(h_tok * w_tok, frames)
        t0 = time.perf_counter()
        x = sampler.sample(self.model, s2.pack(z, p), img_ids, txt, txt_ids, y_vec, timesteps,
                           frames, masks=masks, masked_ref=masked_ref, cond_type=cond_type,
                           progress=progress)
        self._sync()
        timings["sample_s"] += time.perf_counter() - t0
        x = s2.unpack(x, height, width, frames, p, comp)
        if lat_refs is not None and cond_type.startswith("i2v"):
            for j, entry in enumerate(lat_refs):  # the given frames back, as upstream
                if cond_type in ("i2v_head", "i2v_loop"):
                    x[j, :, :1] = entry[0].to(x.dtype)
                if cond_type == "i2v_tail":
                    x[j, :, -1:] = entry[0].to(x.dtype)
                if cond_type == "i2v_loop":
                    x[j, :, -1:] = entry[1].to(x.dtype)
        t0 = time.perf_counter()
        video = self.vae.decode(x.to(self.vae.dtype), num_frames=num_frames)
        video = video[:, :, :num_frames]
        if not sampler.is_causal_vae and cond_type.startswith("i2v"):
            pad = int(getattr(self.vae, "compression", (1,))[0]) - 1
            if pad > 0 and cond_type in ("i2v_head", "i2v_loop"):
                video = video[:, :, pad:]
            if pad > 0 and cond_type in ("i2v_tail", "i2v_loop"):
                video = video[:, :, :-pad]
        self._sync()
        timings["decode_s"] += time.perf_counter() - t0
        return x.float().cpu(), video.float().clamp(-1, 1).cpu()

    def report(self) -> Optional[str]:
        """The cache manager's run report, or None without a cache."""
        return None if self.cache_manager is None else self.cache_manager.report()

    def attach_cache(self, cache: Any, compile: Any = None):
        """Attach cache policy ``cache`` (as the config's ``cache`` key, or a policy object) to
        the model in place of any attached one; returns its manager."""
        policy = build_policy(cache)
        self.remove_cache()
        self.cache_manager = apply_cache(self.model, policy, compile=compile)
        return self.cache_manager

    def remove_cache(self) -> None:
        """Detach the cache: the model is exactly the uncached one again."""
        remove_cache(self.model)
        self.cache_manager = None


# ----------------------------------------------------------------------------- build
def _build_text(cfg: Any, key: str, device, dtype):
    val = _as_dict(_get(cfg, key))
    if not isinstance(val, dict) or "type" not in val:
        raise ValueError(f"config key {key!r}={val!r} is not accepted; accepted: dict(type="
                         f"'text_embedder' or 'hashed_text_embedder', ...)")
    enc = build_module(val, TEXT_ENCODERS, device=device, dtype=dtype)
    return enc.eval() if isinstance(enc, torch.nn.Module) else enc


def _build_model(model_cfg: dict, device, dtype, enable_sequence_parallelism=False):
    """The model, built as upstream's ``prepare_models`` does for its 2.0 types (the builder
    gets ``device_map`` and ``torch_dtype``; through the DuCa wrapper they reach the inner
    model), then moved to ``device`` / ``dtype``."""
    inner = _as_dict(model_cfg.get("model")) if model_cfg.get("type") == "DuCa" else model_cfg
    extra = {}
    if isinstance(inner, dict) and inner.get("type") in V2_MODEL_TYPES:
        extra = dict(device_map=device, torch_dtype=dtype)
        if enable_sequence_parallelism:
            extra["enable_sequence_parallelism"] = True
    model = build_module(model_cfg, MODELS, **extra)
    return model.to(device, dtype).eval()


def build_v2_from_config(cfg: Any, device: Any = None, dtype: Any = None,
                         enable_sequence_parallelism: bool = False,
                         ckpt_path: Optional[str] = None,
                         init_seed: Optional[int] = None) -> PipelineV2:
    """Build a :class:`PipelineV2` from an Open-Sora 2.0 config (module docstring).

    ``device`` defaults to CUDA when available, else CPU; ``dtype`` to the config's ``dtype``
    (bf16 when unset, as upstream). ``ckpt_path`` replaces ``model.from_pretrained``. The
    settings are checked (:func:`sampling_settings`) before anything is built; the global
    torch RNG is seeded with ``init_seed`` (default: the config's ``seed``) first, so random
    weights are the same on every run. ``enable_sequence_parallelism`` goes to the 2.0 model
    builders (the MMDiT's Ulysses attention over the process's sequence-parallel group)."""
    settings = sampling_settings(cfg)
    for key in ("model", "ae", "t5", "clip"):
        val = _as_dict(_get(cfg, key))
        if not isinstance(val, dict) or "type" not in val:
            raise ValueError(f"config key {key!r}={val!r} is not accepted; accepted: "
                             f"dict(type=...) naming a registered type")
    cache_cfg = _as_dict(_get(cfg, "cache"))
    if cache_cfg is not None and (not isinstance(cache_cfg, dict) or "type" not in cache_cfg):
        raise ValueError(f"config key 'cache'={cache_cfg!r} is not accepted; accepted: "
                         f"dict(type=<a registered cache policy>, ...) or None")
    compile_cfg = _as_dict(_get(cfg, "compile"))
    compile_options(compile_cfg)
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(_get(cfg, "dtype", "bf16") if dtype is None else dtype)
    torch.manual_seed(int(_get(cfg, "seed", 0) if init_seed is None else init_seed))

    sampler = s2.OpenSora2Sampler(**settings["sampler"])
    ae = build_module(_as_dict(_get(cfg, "ae")), VAES).to(device, dtype).eval()
    spatial = getattr(ae, "spatial_compression", None)
    if spatial is not None and spatial * settings["patch_size"] != settings["spatial_compression"]:
        raise ValueError(
            f"ae_spatial_compression={settings['spatial_compression']} does not match the AE "
            f"({spatial} px per latent pixel) times patch_size={settings['patch_size']}; "
            f"accepted: {spatial * settings['patch_size']}")
    t5 = _build_text(cfg, "t5", device, dtype)
    clip = _build_text(cfg, "clip", device, dtype)

    model_cfg = _as_dict(_get(cfg, "model"))
    if ckpt_path is not None:
        model_cfg["from_pretrained"] = ckpt_path
    inner = model_cfg.get("model") if model_cfg.get("type") == "DuCa" else model_cfg
    inner = _as_dict(inner) or {}
    for key, have, what in (("in_channels", ae.out_channels * settings["patch_size"] ** 2,
                             "ae channels x patch_size^2"),
                            ("context_in_dim", getattr(t5, "output_dim", None), "t5 width"),
                            ("vec_in_dim", getattr(clip, "output_dim", None), "clip width")):
        want = inner.get(key)
        if want is not None and have is not None and want != have:
            raise ValueError(f"model.{key}={want} does not match the {what} ({have}); "
                             f"accepted: {have}")
    model = _build_model(model_cfg, device, dtype, enable_sequence_parallelism)

    manager = None
    if cache_cfg is not None:
        manager = apply_cache(model, cache_cfg, compile=compile_cfg)
    else:  # a manager attached by the DuCa wrapper, or None
        manager = get_cache_manager(model)
        if manager is not None:
            manager.set_compile(compile_cfg)
        elif compile_options(compile_cfg) is not None:
            manager = apply_cache(model, dict(type="none"), compile=compile_cfg)

    defaults = dict(num_frames=settings["num_frames"],
                    image_size=(settings["height"], settings["width"]), seed=settings["seed"],
                    batch_size=_get(cfg, "batch_size") or 1, cond_type=settings["cond_type"],
                    fps=settings["fps"], motion_score=settings["motion_score"],
                    neg=settings["neg"], spatial_compression=settings["spatial_compression"],
                    ref=plain(_get(cfg, "ref")), prompts=plain(_get(cfg, "prompt")))
    if isinstance(defaults["prompts"], str):
        defaults["prompts"] = [defaults["prompts"]]
    pipe = PipelineV2(model, ae, t5, clip, sampler, device, dtype, cache_manager=manager,
                      defaults=defaults)
    pipe.check_video(settings["num_frames"], settings["height"], settings["width"])
    return pipe


def apply_cli_overrides(cfg: Any, flags: dict) -> Any:
    """A 2.0 config with the inference tool's flags (``vars(args)``) merged in, in place:
    the video flags become upstream's top-level aliases (``--num-sampling-steps`` ->
    ``num_steps``, ``--cfg-scale`` -> ``guidance``), ``--seed`` replaces
    ``sampling_option.seed``, and afterwards the top-level ``seed`` is the noise seed of prompt
    0 and ``save_fps`` defaults to ``fps_save``."""
    if flags.get("prompt") is not None:
        cfg.prompt = list(flags["prompt"])
    elif flags.get("prompt_path") is not None:
        cfg.prompt = None
        cfg.prompt_path = flags["prompt_path"]
    if flags.get("image_size") is not None:
        cfg.image_size = tuple(flags["image_size"])
    elif flags.get("resolution") is not None or flags.get("aspect_ratio") is not None:
        cfg.image_size = None
    for key in ("resolution", "aspect_ratio", "num_frames", "fps", "save_fps", "seed",
                "batch_size", "dtype", "save_dir", "sample_name", "dist_timeout",
                "cfg_parallel"):
        if flags.get(key) is not None:
            cfg[key] = flags[key]
    if isinstance(cfg.get("num_frames"), str) and cfg["num_frames"].isdigit():
        cfg.num_frames = int(cfg["num_frames"])
    if flags.get("num_sampling_steps") is not None:
        cfg.num_steps = flags["num_sampling_steps"]
    if flags.get("cfg_scale") is not None:
        cfg.guidance = flags["cfg_scale"]
    if flags.get("ckpt_path") is not None:
        cfg.model["from_pretrained"] = flags["ckpt_path"]
    if flags.get("compile") and not cfg.get("compile"):
        cfg.compile = dict(mode="default")
    so = cfg.get("sampling_option")
    if flags.get("seed") is not None and so is not None and so.get("seed") is not None:
        so["seed"] = flags["seed"]
    elif so is not None and so.get("seed") is not None:
        cfg.seed = so["seed"]
    if cfg.get("save_fps") is None and cfg.get("fps_save") is not None:
        cfg.save_fps = cfg["fps_save"]
    return cfg


__all__ = ["PipelineV2", "build_v2_from_config", "sampling_settings", "is_v2_config",
           "apply_cli_overrides", "image_size_v2", "aspect_ratio_sizes", "pixels_of",
           "prompt_text", "load_reference", "resize_crop", "select_reference_frames",
           "round_up16", "SAMPLING_KEYS", "SAMPLER_KEYS", "ALIASES", "ASPECT_RATIOS",
           "V2_MODEL_TYPES"]
