"""Prompts -> latents -> frames: the one generation path every tool uses.

::

    cfg = mmengine.Config.fromfile("configs/tiny/inference.py")
    pipe = build_from_config(cfg, device="cpu", dtype="fp32")
    out = pipe.generate(["a red circle moving left"], seed=42)
    out["video"]      # float32 [B, 3, T, H, W] in [-1, 1], on the CPU
    out["latents"]    # float32 [B, C, t, h, w], on the CPU
    out["timings"]    # dict(text_s, encode_s, sample_s, decode_s, total_s)

Config keys read (Open-Sora 1.2 names): ``model``, ``vae``, ``text_encoder``, ``scheduler``
(each ``dict(type=...)``), ``resolution`` + ``aspect_ratio`` or ``image_size = (H, W)``,
``num_frames`` (an int or an Open-Sora name such as ``"2s"``), ``fps``, ``dtype``, ``seed``,
``aes`` / ``flow`` (scores appended to prompts, as Open-Sora 1.2 does), the optional
top-level ``cache = dict(type=...)`` (attached with :func:`opensora_duca.cache.apply_cache`) and
``cfg_parallel`` (1, or 2: the two halves of the classifier-free-guidance batch on two groups
of ranks, see :mod:`opensora_duca.parallel.cfg`), and Open-Sora 1.3's image / video
conditioning settings ``cond_type``, ``condition_frame_length``, ``image_cfg_scale``,
``use_sdedit``, ``use_oscillation_guidance_for_text`` / ``_for_image`` (defaults of
:meth:`Pipeline.generate`, whose ``references`` argument supplies the reference frames).

Image / video conditioning (one loop of upstream 1.3's ``cond_type`` runs): the references
(pixels) are encoded by the VAE, placed into the reference latents ``z_cond`` and the given
latent frames ``mask_index`` by :func:`reference_condition`, and the sampler runs its
three-way guidance (:mod:`opensora_duca.schedulers.rflow`). Refused, before any model runs:
``cfg_parallel=2``, a model without the 1.3 reference embedders, and a cache with
``cfg_shared_selection``.

Seeding: the initial noise of prompt ``j`` of a :meth:`Pipeline.generate` call is drawn on the
CPU from a ``torch.Generator`` seeded with ``seeds[j]`` (default ``seed + j``) and then moved
to the device, so it is the same on every rank and does not depend on the batch size.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import time
from typing import Any, Optional, Sequence

import torch

from .cache import apply_cache, build_policy, get_cache_manager, remove_cache
from .cache.calibrate import check_calibration_model
from .parallel.cfg import check_cache_policy, setup_cfg_parallel
from .registry import MODELS, SCHEDULERS, TEXT_ENCODERS, VAES, build_module
from .utils.compile import compile_options
from .utils.config import plain
from .utils.dtype import resolve_dtype

# ----------------------------------------------------------------- video size helpers
#: pixel area of each resolution name (its 9:16 base size, H x W, as Open-Sora's tables)
RESOLUTION_AREAS = {
    "144p": 144 * 256,
    "240p": 240 * 426,
    "360p": 360 * 640,
    "480p": 480 * 854,
    "720p": 720 * 1280,
    "1080p": 1080 * 1920,
}
#: Open-Sora's named frame counts
NUM_FRAMES_NAMES = {"1x": 51, "2x": 102, "4x": 204, "8x": 408, "16x": 816,
                    "2s": 51, "4s": 102, "8s": 204, "16s": 408, "32s": 816}


def parse_aspect_ratio(aspect_ratio: Any) -> float:
    """``"9:16"`` (height:width, as Open-Sora) or a number -> height / width."""
    if isinstance(aspect_ratio, (int, float)) and not isinstance(aspect_ratio, bool):
        if aspect_ratio > 0:
            return float(aspect_ratio)
    elif isinstance(aspect_ratio, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*", aspect_ratio)
        if m and float(m.group(1)) > 0 and float(m.group(2)) > 0:
            return float(m.group(1)) / float(m.group(2))
        try:
            if float(aspect_ratio) > 0:
                return float(aspect_ratio)
        except ValueError:
            pass
    raise ValueError(f"aspect_ratio={aspect_ratio!r} is not accepted; accepted: 'H:W' such as "
                     f"'9:16' or '1:1', or a positive number (height / width)")


def get_image_size(resolution: str, aspect_ratio: Any = "9:16") -> tuple[int, int]:
    """(H, W) in pixels for an Open-Sora resolution name and aspect ratio (height:width).

    H = round(sqrt(A r)), W = round(sqrt(A / r)) with A the area of the name's 9:16 size; this
    gives Open-Sora's sizes for 9:16, 16:9 and 1:1 (e.g. 480p 9:16 -> (480, 854), 240p 1:1 ->
    (320, 320)) and may differ from its tables by a pixel or two for other ratios.
    """
    if resolution not in RESOLUTION_AREAS:
        raise ValueError(f"resolution={resolution!r} is not accepted; accepted: "
                         f"{list(RESOLUTION_AREAS)} (or set image_size=(H, W))")
    r = parse_aspect_ratio(aspect_ratio)
    area = RESOLUTION_AREAS[resolution]
    return int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))


def get_num_frames(num_frames: Any) -> int:
    """An int >= 1, or an Open-Sora name ("2s", "4x", ...) -> frame count."""
    if isinstance(num_frames, str):
        if num_frames in NUM_FRAMES_NAMES:
            return NUM_FRAMES_NAMES[num_frames]
        if num_frames.isdigit():
            num_frames = int(num_frames)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r} is not accepted; accepted: an int >= 1 or "
                         f"one of {sorted(NUM_FRAMES_NAMES)}")
    return num_frames


def resolve_image_size(image_size: Any = None, resolution: Any = None,
                       aspect_ratio: Any = None) -> tuple[int, int]:
    """``image_size`` wins; otherwise ``resolution`` + ``aspect_ratio`` (default "9:16")."""
    if image_size is not None:
        ok = isinstance(image_size, (list, tuple)) and len(image_size) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in image_size)
        if not ok:
            raise ValueError(f"image_size={image_size!r} is not accepted; accepted: (H, W), two "
                             f"positive ints")
        return int(image_size[0]), int(image_size[1])
    if resolution is None:
        raise ValueError("the video size is not set: give image_size=(H, W) or resolution "
                         f"(one of {list(RESOLUTION_AREAS)}) with aspect_ratio")
    return get_image_size(resolution, "9:16" if aspect_ratio is None else aspect_ratio)


# ----------------------------------------------------------------------------- prompts
def load_prompts(path: str, start_idx: Optional[int] = None,
                 end_idx: Optional[int] = None) -> list[str]:
    """Prompts of a text file, one per line (surrounding spaces stripped, blank lines dropped),
    optionally the slice ``[start_idx:end_idx]``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt_path={path!r} is not an existing file; accepted: a text "
                                f"file with one prompt per line")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f]
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt_path={path!r} is not UTF-8 text (byte {err.start}: "
                         f"{err.reason}); accepted: a UTF-8 text file with one prompt per "
                         f"line") from None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt_path={path!r} holds no prompts (only blank lines)")
    return prompts[start_idx:end_idx]


def append_scores(prompts: Sequence[str], aes: Optional[float] = None,
                  flow: Optional[float] = None) -> list[str]:
    """Append Open-Sora 1.2's score phrases (" aesthetic score: 6.5.", " motion score: ...")."""
    out = []
    for p in prompts:
        if aes is not None and "aesthetic score:" not in p:
            p = f"{p} aesthetic score: {aes:.1f}."
        if flow is not None and "motion score:" not in p:
            p = f"{p} motion score: {flow:.1f}."
        out.append(p)
    return out


def prompt_to_filename(prompt: str, max_len: int = 100) -> str:
    """A file-name-safe version of a prompt (letters, digits, '-', '_'; spaces -> '_')."""
    name = re.sub(r"[^A-Za-z0-9_\- ]+", "", prompt).strip().replace(" ", "_")
    return name[:max_len] or "prompt"


def unique_filenames(prompts: Sequence[str], max_len: int = 100) -> list[str]:
    """One distinct file name per prompt: :func:`prompt_to_filename`, and where different
    prompts map to the same name ("a red circle!" and "a red circle?", or prompts that agree
    in their first ``max_len`` characters), each of them gets ``-`` and the first 8 hex digits
    of the SHA-1 of its full text appended; a prompt listed more than once gets ``-{index}``
    (its position in ``prompts``) as well. The names depend only on the list, so a rerun of
    the same list maps every prompt to the same file."""
    base = [prompt_to_filename(p, max_len) for p in prompts]
    texts: dict[str, set] = {}
    for b, p in zip(base, prompts):
        texts.setdefault(b, set()).add(p)
    names = [b if len(texts[b]) == 1 else
             f"{b}-{hashlib.sha1(p.encode('utf-8')).hexdigest()[:8]}"
             for b, p in zip(base, prompts)]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    names = [n if counts[n] == 1 else f"{n}-{i}" for i, n in enumerate(names)]
    if len(set(names)) != len(names):  # only a prompt that spells another one's suffix
        raise ValueError(f"prompts map to clashing file names {sorted(names)}; accepted: "
                         f"prompts whose file names differ")
    return names


# ------------------------------------------------------- reference (i2v / v2v) conditioning
#: Open-Sora 1.3's ``cond_type`` values (single-loop generation)
COND_TYPES = ("i2v_head", "i2v_tail", "i2v_loop", "v2v_head")


#: top-level config keys of Open-Sora 1.3's i2v / v2v runs that :meth:`Pipeline.generate` reads
CONDITIONING_KEYS = ("cond_type", "condition_frame_length", "image_cfg_scale", "use_sdedit",
                     "use_oscillation_guidance_for_text", "use_oscillation_guidance_for_image")


def check_cond_type(cond_type: Any) -> Optional[str]:
    """``cond_type`` (None or "none": text to video) -> None or one of :data:`COND_TYPES`."""
    if cond_type is None or cond_type == "none":
        return None
    if cond_type not in COND_TYPES:
        raise ValueError(f"cond_type={cond_type!r} is not accepted; accepted: None, 'none' or one "
                         f"of {list(COND_TYPES)}")
    return cond_type


def reference_condition(cond_type: str, refs: Sequence[Sequence[torch.Tensor]],
                        latent_shape: Sequence[int], condition_frame_length: int = 5
                        ) -> tuple[torch.Tensor, list[int]]:
    """The reference latents ``z_cond`` [B, C, T, H, W] (zero outside the given frames) and the
    given latent frames ``mask_index`` of Open-Sora 1.3's single-loop ``cond_type``s.

    ``refs[b]``: sample ``b``'s reference latents, one or two tensors [C, t_r, H, W].
    ``i2v_head``: frame 0 <- the reference's first frame. ``i2v_tail``: the last frame <- the
    reference's last frame. ``i2v_loop``: both (the last frame from the second reference's
    first frame when a sample has two, else from the first reference's last frame; needs
    T >= 2). ``v2v_head``: the first L frames <- the reference's first L frames, with
    L = min(condition_frame_length, T, the shortest first reference of ``refs``).
    """
    b, c, t = latent_shape[:3]
    cond_type = check_cond_type(cond_type)
    if cond_type is None:
        raise ValueError("reference_condition needs a cond_type; accepted: one of "
                         f"{list(COND_TYPES)}")
    if len(refs) != b or any(not 1 <= len(r) <= 2 for r in refs):
        raise ValueError(f"references: {len(refs)} entries for a batch of {b}; accepted: one "
                         f"entry per sample, each one or two references")
    for j, entry in enumerate(refs):
        for r in entry:
            if r.dim() != 4 or r.shape[0] != c or tuple(r.shape[2:]) != tuple(latent_shape[3:]):
                raise ValueError(f"references[{j}]: latent {tuple(r.shape)} is not accepted; "
                                 f"accepted: [{c}, frames, {latent_shape[3]}, "
                                 f"{latent_shape[4]}] (the run's latent size)")
    if cond_type == "i2v_loop" and t < 2:
        raise ValueError(f"cond_type='i2v_loop' needs at least 2 latent frames (it conditions "
                         f"the first and the last); this run has {t}")
    z_cond = torch.zeros(tuple(latent_shape), dtype=refs[0][0].dtype, device=refs[0][0].device)
    if cond_type == "v2v_head":
        n = min(condition_frame_length, t, min(r[0].shape[1] for r in refs))
        index = list(range(n))
        for j, entry in enumerate(refs):
            z_cond[j, :, :n] = entry[0][:, :n]
        return z_cond, index
    index = {"i2v_head": [0], "i2v_tail": [t - 1], "i2v_loop": [0, t - 1]}[cond_type]
    for j, entry in enumerate(refs):
        if cond_type in ("i2v_head", "i2v_loop"):
            z_cond[j, :, 0] = entry[0][:, 0]
        if cond_type == "i2v_tail":
            z_cond[j, :, t - 1] = entry[0][:, -1]
        if cond_type == "i2v_loop":
            z_cond[j, :, t - 1] = entry[1][:, 0] if len(entry) == 2 else entry[0][:, -1]
    return z_cond, index


# --------------------------------------------------------------------------- pipeline
class Pipeline:
    """Text encoder + latent codec + STDiT3 + sampler (+ optional cache manager).

    Build it with :func:`build_from_config`. ``defaults`` holds the config's num_frames,
    image_size, fps, seed and batch_size, used when :meth:`generate` is not given them.
    """

    def __init__(self, model, text_encoder, vae, scheduler, device, dtype,
                 cache_manager=None, defaults: Optional[dict] = None, aes=None, flow=None,
                 cfg_parallel=None):
        self.model, self.text_encoder = model, text_encoder
        self.vae, self.scheduler = vae, scheduler
        self.device, self.dtype = torch.device(device), dtype
        self.cache_manager = cache_manager
        self.defaults = dict(defaults or {})
        self.aes, self.flow = aes, flow
        self.cfg_parallel = cfg_parallel  # a parallel.cfg.CFGParallel, or None

    def latent_size(self, num_frames: int, height: int, width: int) -> list[int]:
        return list(self.vae.get_latent_size((num_frames, height, width)))

    @torch.no_grad()
    def initial_noise(self, seeds: Sequence[int], latent_size: Sequence[int],
                      generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
        """[len(seeds), C, t, h, w] standard normal noise, one CPU generator per sample
        (seeded with its seed, or ``generators``, which the draw advances), identical on every
        rank, moved to the pipeline's device and dtype."""
        if generators is None:
            generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        zs = []
        for g in generators:
            zs.append(torch.randn(self.vae.out_channels, *latent_size, generator=g,
                                  dtype=torch.float32))
        return torch.stack(zs).to(self.device, self.dtype)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str] | str, num_frames: Any = None,
                 height: Optional[int] = None, width: Optional[int] = None,
                 seed: Optional[int] = None, fps: Optional[float] = None,
                 seeds: Optional[Sequence[int]] = None, batch_size: Optional[int] = None,
                 num_sampling_steps: Optional[int] = None, cfg_scale: Optional[float] = None,
                 progress: bool = False, references: Optional[Sequence[Any]] = None,
                 cond_type: Any = None, condition_frame_length: Optional[int] = None,
                 image_cfg_scale: Optional[float] = None, use_sdedit: Optional[bool] = None,
                 use_oscillation_guidance_for_text: Optional[bool] = None,
                 use_oscillation_guidance_for_image: Optional[bool] = None) -> dict:
        """Generate one video per prompt.

        Args:
            prompts: a string or a list of strings.
            num_frames, height, width, fps, seed, batch_size: default to the config's values.
            seeds: one noise seed per prompt (default ``seed + j`` for prompt ``j``).
            num_sampling_steps, cfg_scale: override the scheduler's values for this call.
            progress: show the sampler's tqdm bar.
            references, cond_type, condition_frame_length: Open-Sora 1.3 image / video
                conditioning (i2v / v2v, one loop). ``references``: one entry per prompt, a
                pixel video [3, F, H, W] in [-1, 1] at the run's size (an image: F = 1) or a
                list of one or two of them; the VAE encodes them and
                :func:`reference_condition` places them by ``cond_type`` (one of
                :data:`COND_TYPES`; default: the config's ``cond_type``) with
                ``condition_frame_length`` (v2v_head, latent frames; default: the config's,
                else 5). The sampler then runs its three-way guidance with
                ``image_cfg_scale`` (default: the config's, else 7.5, as upstream's script) and
                ``use_sdedit`` (default: the config's, else False).
            use_oscillation_guidance_for_text, use_oscillation_guidance_for_image: the
                sampler's oscillation switches (default: the config's, else the scheduler's
                ``use_oscillation_guidance``).

        Returns ``dict(video=[B, 3, T, H, W] float32 in [-1, 1], latents=[B, C, t, h, w]
        float32, prompts=[the prompts as encoded], seeds=[...], timings=dict(...),
        mask_index=[the given latent frames] or None, ...)`` with tensors on the CPU.

        With a reference, the noise SDEdit draws at every step comes from the prompt's own CPU
        generator (the one that drew its initial noise, continued), so a clip does not depend
        on its batch-mates or on the rank.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(
                isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts={prompts!r} is not accepted; accepted: a non-empty list of "
                             f"strings")
        d = self.defaults
        num_frames = get_num_frames(d.get("num_frames") if num_frames is None else num_frames)
        if height is None or width is None:
            h0, w0 = d.get("image_size", (None, None))
            height, width = height or h0, width or w0
        height, width = resolve_image_size((height, width))
        fps = d.get("fps", 24) if fps is None else fps
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0:
            raise ValueError(f"fps={fps!r} is not accepted; accepted: a positive number")
        if seeds is None:
            seed = d.get("seed", 0) if seed is None else seed
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"seed={seed!r} is not accepted; accepted: an int")
            seeds = [seed + j for j in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds has {len(seeds)} values for {len(prompts)} prompts; "
                             f"accepted: one seed per prompt")
        batch_size = batch_size or d.get("batch_size") or len(prompts)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not accepted; accepted: an int >= 1")

        sched = self.scheduler
        saved = (sched.num_sampling_steps, sched.cfg_scale)
        if num_sampling_steps is not None:
            if isinstance(num_sampling_steps, bool) or not isinstance(num_sampling_steps, int) \
                    or num_sampling_steps < 1:
                raise ValueError(f"num_sampling_steps={num_sampling_steps!r} is not accepted; "
                                 f"accepted: an int >= 1")
        cond = self._conditioning(
            len(prompts), num_frames, height, width, references,
            d.get("cond_type") if cond_type is None else cond_type,
            d.get("condition_frame_length") if condition_frame_length is None
            else condition_frame_length,
            d.get("image_cfg_scale") if image_cfg_scale is None else image_cfg_scale,
            d.get("use_sdedit") if use_sdedit is None else use_sdedit,
            d.get("use_oscillation_guidance_for_text") if use_oscillation_guidance_for_text
            is None else use_oscillation_guidance_for_text,
            d.get("use_oscillation_guidance_for_image") if use_oscillation_guidance_for_image
            is None else use_oscillation_guidance_for_image)
        if num_sampling_steps is not None:
            sched.num_sampling_steps = num_sampling_steps
        if cfg_scale is not None:
            sched.cfg_scale = float(cfg_scale)
        timings = dict(text_s=0.0, encode_s=0.0, sample_s=0.0, decode_s=0.0)
        t_all = time.perf_counter()
        videos, latents, encoded = [], [], []
        mask_index = None
        try:
            # the timestep transform's errors (a degenerate frame count) before any model runs
            sched.timesteps(height, width, num_frames)
            latent_size = self.latent_size(num_frames, height, width)
            for b0 in range(0, len(prompts), batch_size):
                batch = append_scores(prompts[b0:b0 + batch_size], self.aes, self.flow)
                encoded += batch
                refs = None if cond["references"] is None else \
                    cond["references"][b0:b0 + batch_size]
                z, v, mask_index = self._generate_batch(
                    batch, seeds[b0:b0 + batch_size], latent_size, num_frames, height, width,
                    fps, progress, timings, cond, refs)
                latents.append(z)
                videos.append(v)
        finally:
            sched.num_sampling_steps, sched.cfg_scale = saved
        timings["total_s"] = time.perf_counter() - t_all
        return dict(video=torch.cat(videos), latents=torch.cat(latents), prompts=encoded,
                    seeds=list(seeds), timings=timings, num_frames=num_frames,
                    image_size=(height, width), latent_size=latent_size, fps=fps,
                    mask_index=mask_index)

    def _conditioning(self, n, num_frames, height, width, references, cond_type,
                      condition_frame_length, image_cfg_scale, use_sdedit, osc_text, osc_image
                      ) -> dict:
        """Check a call's i2v / v2v settings before anything runs; the sampler's keywords."""
        cond_type = check_cond_type(cond_type)
        for key, val in (("use_oscillation_guidance_for_text", osc_text),
                         ("use_oscillation_guidance_for_image", osc_image)):
            if val is not None and not isinstance(val, bool):
                raise ValueError(f"{key}={val!r} is not accepted; accepted: None (the "
                                 f"scheduler's use_oscillation_guidance), True or False")
        out = dict(cond_type=cond_type, references=None, condition_frame_length=None,
                   sample=dict(use_oscillation_guidance_for_text=osc_text,
                               use_oscillation_guidance_for_image=osc_image))
        if cond_type is None:
            if references is not None:
                raise ValueError("references given without cond_type; accepted: cond_type one "
                                 f"of {list(COND_TYPES)} with references, or no references")
            return out
        length = 5 if condition_frame_length is None else condition_frame_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"condition_frame_length={condition_frame_length!r} is not "
                             f"accepted; accepted: an int >= 1 (latent frames)")
        scale = 7.5 if image_cfg_scale is None else image_cfg_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
                not math.isfinite(scale):
            raise ValueError(f"image_cfg_scale={image_cfg_scale!r} is not accepted; accepted: a "
                             f"finite number (default 7.5)")
        sdedit = False if use_sdedit is None else use_sdedit
        if not isinstance(sdedit, bool):
            raise ValueError(f"use_sdedit={use_sdedit!r} is not accepted; accepted: True or "
                             f"False")
        if self.cfg_parallel is not None:
            raise ValueError(f"cond_type={cond_type!r} is not accepted with cfg_parallel=2: the "
                             f"i2v / v2v guidance batch has three parts (text + image, image, "
                             f"neither), which do not split into the two CFG halves; accepted: "
                             f"cfg_parallel=1")
        if getattr(self.model, "cond_embedders", None) is False:
            raise ValueError(f"cond_type={cond_type!r} needs a model with the 1.3 reference "
                             f"embedders; accepted: model cond_embedders=True (Open-Sora 1.3 "
                             f"weights), or cond_type=None")
        policy = getattr(self.cache_manager, "policy", None)
        if getattr(policy, "cfg_shared_selection", False):
            raise ValueError(f"cache cfg_shared_selection=True is not accepted with "
                             f"cond_type={cond_type!r} (it pairs the two halves of a two-way "
                             f"guidance batch; i2v / v2v runs a three-way one); accepted: False")
        if not isinstance(references, (list, tuple)) or len(references) != n:
            got = len(references) if isinstance(references, (list, tuple)) else references
            raise ValueError(f"cond_type={cond_type!r} needs references, one per prompt; got "
                             f"{got!r} for {n} prompt(s); accepted: a list of {n} pixel videos "
                             f"[3, F, {height}, {width}] (or lists of one or two of them)")
        refs = []
        for j, entry in enumerate(references):
            entry = list(entry) if isinstance(entry, (list, tuple)) else [entry]
            ok = 1 <= len(entry) <= 2 and all(
                isinstance(r, torch.Tensor) and r.dim() == 4 and r.shape[0] == 3
                and tuple(r.shape[2:]) == (height, width) and r.shape[1] >= 1 for r in entry)
            if not ok:
                got = [tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
                       for r in entry]
                raise ValueError(f"references[{j}]={got} is not accepted; accepted: a pixel "
                                 f"video [3, F, {height}, {width}] (the run's size; an image: "
                                 f"F = 1) or a list of one or two of them")
            refs.append(entry)
        latent_t = self.latent_size(num_frames, height, width)[0]
        if cond_type == "v2v_head":  # one length for the call: no clip depends on the batch
            shortest = min(self.latent_size(r[0].shape[1], height, width)[0] for r in refs)
            length = min(length, latent_t, shortest)
        out.update(references=refs, condition_frame_length=length)
        out["sample"].update(image_cfg_scale=float(scale), use_sdedit=sdedit)
        return out

    def _generate_batch(self, prompts, seeds, latent_size, num_frames, height, width, fps,
                        progress, timings, cond, refs=None):
        n = len(prompts)
        t0 = time.perf_counter()
        enc = self.text_encoder.encode(list(prompts))
        y, mask = enc["y"].to(self.device), enc.get("mask")
        mask = None if mask is None else mask.to(self.device)
        y_null = self.text_encoder.null(n).to(self.device, y.dtype)
        timings["text_s"] += time.perf_counter() - t0

        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        z = self.initial_noise(seeds, latent_size, generators=generators)
        additional_args = dict(
            height=torch.tensor([height] * n, device=self.device, dtype=self.dtype),
            width=torch.tensor([width] * n, device=self.device, dtype=self.dtype),
            fps=torch.tensor([fps] * n, device=self.device, dtype=self.dtype))
        kwargs = dict(mask=mask, additional_args=additional_args, height=height, width=width,
                      num_frames=num_frames, progress=progress, cfg_parallel=self.cfg_parallel,
                      **cond["sample"])
        mask_index = None
        if refs is not None:
            t0 = time.perf_counter()
            lat = [[self.vae.encode(r[None].to(self.device, self.vae.dtype))[0].to(self.dtype)
                    for r in entry] for entry in refs]
            z_cond, mask_index = reference_condition(cond["cond_type"], lat, z.shape,
                                                     cond["condition_frame_length"])
            kwargs.update(z_cond=z_cond, mask_index=mask_index, generators=generators)
            _sync(self.device)
            timings["encode_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.cache_manager is not None:  # the timesteps on the host: the cache reads none
            # float32, as the sampler passes them (not rounded to the model's dtype)
            host_ts = self.scheduler.timesteps(height, width, num_frames).tolist()
            with self.cache_manager.session(num_steps=self.scheduler.num_sampling_steps,
                                            timesteps=host_ts):
                z = self.scheduler.sample(self.model, z, y, y_null, **kwargs)
        else:
            z = self.scheduler.sample(self.model, z, y, y_null, **kwargs)
        _sync(self.device)
        timings["sample_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        video = self.vae.decode(z.to(self.vae.dtype), num_frames=num_frames)
        _sync(self.device)
        timings["decode_s"] += time.perf_counter() - t0
        return z.float().cpu(), video.float().clamp(-1, 1).cpu(), mask_index

    def report(self) -> Optional[str]:
        """The cache manager's run report, or None without a cache."""
        return None if self.cache_manager is None else self.cache_manager.report()

    def attach_cache(self, cache: Any, compile: Any = None):
        """Attach cache policy ``cache`` (``dict(type="DuCa", ...)`` as the config's ``cache``
        key, or a policy object) to the model, in place of any attached one; later
        :meth:`generate` calls use it. Returns the cache manager (``report()``, ``stats()``).
        ``compile``: as the config's ``compile`` key. The policy is checked (and, with
        ``cfg_parallel=2``, refused if it couples the CFG halves) before the model is touched."""
        policy = build_policy(cache)
        check_calibration_model(policy, self.model)
        if self.cfg_parallel is not None:
            check_cache_policy(policy)
        self.remove_cache()
        self.cache_manager = apply_cache(self.model, policy, compile=compile)
        if self.cfg_parallel is not None:
            self.cache_manager.batch_part = (self.cfg_parallel.cfg_rank, 2)
        return self.cache_manager

    def remove_cache(self) -> None:
        """Detach the cache: the model is exactly the uncached one again (no-op without one)."""
        remove_cache(self.model)
        self.cache_manager = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ build
def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _as_dict(value: Any) -> Any:
    value = plain(value)
    return dict(value) if isinstance(value, dict) else value


def build_from_config(cfg: Any, device: Any = None, dtype: Any = None,
                      enable_sequence_parallelism: bool = False,
                      ckpt_path: Optional[str] = None,
                      init_seed: Optional[int] = None) -> Pipeline:
    """Build a :class:`Pipeline` from an mmengine Config (or a plain dict) with Open-Sora keys.

    ``device`` defaults to CUDA when available, else CPU; ``dtype`` (fp32|fp16|bf16 or a
    torch.dtype) defaults to the config's ``dtype`` (fp32 when unset). ``ckpt_path`` replaces
    ``model.from_pretrained``. The model is built as Open-Sora's script builds it, with
    ``input_size`` (latent), ``in_channels=vae.out_channels``,
    ``caption_channels=text_encoder.output_dim``,
    ``model_max_length=text_encoder.model_max_length`` and ``enable_sequence_parallelism``.
    The global torch RNG is seeded with ``init_seed`` (default: the config's ``seed``) before
    anything is built, so random initial weights are the same on every rank and every run.
    With ``cfg_parallel=2`` (torch.distributed initialised, an even world size) the CFG groups
    are created here, collectively, and this rank's half group becomes the process's
    sequence-parallel group.
    """
    for key in ("model", "vae", "text_encoder", "scheduler"):
        val = _cfg_get(cfg, key)
        if val is None:
            raise KeyError(f"config key {key!r} is missing; accepted: dict(type=...) naming a "
                           f"registered {key}")
        if not isinstance(_as_dict(val), dict):
            raise ValueError(f"config key {key!r}={val!r} is not accepted; accepted: "
                             f"dict(type=...)")
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(_cfg_get(cfg, "dtype", "fp32") if dtype is None else dtype)
    num_frames = get_num_frames(_cfg_get(cfg, "num_frames", 1))
    image_size = resolve_image_size(_cfg_get(cfg, "image_size"), _cfg_get(cfg, "resolution"),
                                    _cfg_get(cfg, "aspect_ratio"))

    cfg_parallel = setup_cfg_parallel(_cfg_get(cfg, "cfg_parallel"))
    # random-weight parts (demo configs, tests) must be the same on every rank and every run
    torch.manual_seed(int(_cfg_get(cfg, "seed", 0) if init_seed is None else init_seed))
    text_encoder = build_module(_as_dict(_cfg_get(cfg, "text_encoder")), TEXT_ENCODERS,
                                device=device)
    if isinstance(text_encoder, torch.nn.Module):
        text_encoder = text_encoder.to(device).eval()
    vae = build_module(_as_dict(_cfg_get(cfg, "vae")), VAES).to(device, dtype).eval()
    latent_size = vae.get_latent_size((num_frames, *image_size))

    model_cfg = _as_dict(_cfg_get(cfg, "model"))
    if ckpt_path is not None:
        model_cfg["from_pretrained"] = ckpt_path
    model = build_module(model_cfg, MODELS, input_size=latent_size,
                         in_channels=vae.out_channels,
                         caption_channels=text_encoder.output_dim,
                         model_max_length=text_encoder.model_max_length,
                         enable_sequence_parallelism=enable_sequence_parallelism)
    model = model.to(device, dtype).eval()
    text_encoder.y_embedder = model.y_embedder  # for text_encoder.null(n), as Open-Sora does
    scheduler = build_module(_as_dict(_cfg_get(cfg, "scheduler")), SCHEDULERS)

    manager = None
    cache_cfg = _as_dict(_cfg_get(cfg, "cache"))
    compile_cfg = _as_dict(_cfg_get(cfg, "compile"))
    if cache_cfg is not None:
        if not isinstance(cache_cfg, dict) or "type" not in cache_cfg:
            raise ValueError(f"config key 'cache'={cache_cfg!r} is not accepted; accepted: "
                             f"dict(type=<a registered cache policy>, ...) or None")
        manager = apply_cache(model, cache_cfg, compile=compile_cfg)
    else:  # a manager attached by a model wrapper (type="DuCa"), or None
        manager = get_cache_manager(model)
        if manager is not None:
            manager.set_compile(compile_cfg)
        elif compile_options(compile_cfg) is not None:  # compiled, uncached: policy "none"
            manager = apply_cache(model, dict(type="none"), compile=compile_cfg)

    if cfg_parallel is not None and manager is not None:
        check_cache_policy(manager.policy)
        manager.batch_part = (cfg_parallel.cfg_rank, 2)
    defaults = dict(num_frames=num_frames, image_size=image_size,
                    fps=_cfg_get(cfg, "fps", 24), seed=_cfg_get(cfg, "seed", 0),
                    batch_size=_cfg_get(cfg, "batch_size", 1))
    for key in CONDITIONING_KEYS:  # Open-Sora 1.3's i2v / v2v settings (checked by generate)
        defaults[key] = _cfg_get(cfg, key)
    return Pipeline(model, text_encoder, vae, scheduler, device, dtype, cache_manager=manager,
                    defaults=defaults, aes=_cfg_get(cfg, "aes"), flow=_cfg_get(cfg, "flow"),
                    cfg_parallel=cfg_parallel)


__all__ = ["Pipeline", "build_from_config", "reference_condition", "check_cond_type",
           "COND_TYPES", "CONDITIONING_KEYS", "load_prompts", "append_scores", "get_image_size",
           "get_num_frames", "resolve_image_size", "parse_aspect_ratio", "prompt_to_filename",
           "unique_filenames", "RESOLUTION_AREAS", "NUM_FRAMES_NAMES"]
