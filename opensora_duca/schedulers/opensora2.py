"""Open-Sora 2.0's flow-matching sampler ("opensora2"), written from upstream's formulas.

Schedule (:func:`get_schedule`): ``n + 1`` times ``t_k = 1 - k / n`` (``torch.linspace(1, 0,
n + 1)`` in float32, so the values equal upstream's bit for bit), then, with ``shift=True``,
``t' = a t / (1 + (a - 1) t)``. The shift ``a`` is ``flow_shift`` when given; otherwise it
grows linearly with the tokens per latent frame, ``S`` (``(h / p) (w / p)`` for a latent
``h x w`` and patch ``p``): ``a = base + (max - base) (S - 256) / (4096 - 256)`` (1 at 256
tokens, 3 at 4096), times ``sqrt(latent frames)``. Step ``i`` moves the packed latent by
``(t_{i+1} - t_i) v`` with ``v`` the model's guided velocity (``t_n = 0``).

Latents: noise ``[B, C / p^2, T', p ceil(H / D), p ceil(W / D)]`` with ``C`` the model's
``in_channels``, ``D`` the AE's spatial compression times the patch (16 for the HunyuanVideo
VAE with ``p = 2``, 32 for Video DC-AE with ``p = 1``) and ``T' = (T - 1) // r + 1`` (causal
VAE) or ``T // r`` (otherwise), 1 for an image; :func:`pack` turns it into tokens
``[B, T' h w, C]`` (frame-major, channel order ``(c, row in patch, column in patch)``) and
:func:`unpack` back. :func:`prepare_ids` gives each token its (frame, row, column) position
``img_ids`` and the text tokens zero positions ``txt_ids``.

Guidance (``method="i2v"``, :class:`OpenSora2Sampler`): every step runs the model once on the
batch ``[x, x, x]`` with the captions ``[prompt, negative, negative]`` and the visual
condition ``cond = [c, c, 0]``, where ``c = pack(cat(masks, masked_ref))`` (the given latent
frames' mask and the reference latents there, :func:`prepare_condition`). With ``v_c``,
``v_u`` and ``v_0`` the three thirds of its output (text + image, image only, neither),
``v = v_0 + g_img (v_u - v_0) + g_txt (v_c - v_u)`` (:func:`combine_guidance`). With
``text_osci`` / ``image_osci`` the scale is oscillated (:func:`oscillation_scale`: the scale on
steps ``i < 10`` and even steps, 1 on odd steps after them). With ``scale_temporal_osci`` (i2v
condition types only) and ``g_img > 1``, ``g_img`` becomes a per-frame weight
(:func:`temporal_image_scale`): linear over the latent frames from 1 at frame 0 up to
``linspace(g_img, 1, n + 1)[i]``. The model's ``guidance`` argument is the text scale for every
row (used by models with a guidance embedder). ``method="distill"``: one model call per step on
``x`` alone, no ``cond``, ``v`` = the output.

Condition types (:data:`COND_TYPES`, upstream's ``prepare_inference_condition``): ``t2v``
(nothing given), ``i2v_head`` / ``i2v_tail`` (the first / last latent frame from the
reference's first / last frame), ``i2v_loop`` (both), ``v2v_head`` / ``v2v_tail`` (the first /
last ``8 + causal`` latent frames) and ``v2v_head_half`` / ``v2v_tail_half`` (``16 + causal``
frames: the names upstream's configs document; its code calls them ``v2v_head_easy`` /
``v2v_tail_easy``, accepted too). A one-frame latent (an image) gets no condition, as upstream.

Cache: when a cache manager is attached to the model (:func:`opensora_duca.cache.get_cache_manager`)
the loop runs inside ``manager.session(num_steps=n, timesteps=[t_0, ..., t_{n-1}])`` (the
values the model receives as ``timesteps``, on the host).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

from ..cache import get_cache_manager
from ..registry import SCHEDULERS

#: condition types of :func:`prepare_condition`
COND_TYPES = ("t2v", "i2v_head", "i2v_tail", "i2v_loop", "v2v_head", "v2v_tail",
              "v2v_head_half", "v2v_tail_half")
#: upstream code's names of the "half" types
COND_ALIASES = {"v2v_head_easy": "v2v_head_half", "v2v_tail_easy": "v2v_tail_half"}
METHODS = ("i2v", "distill")


def check_cond_type(cond_type: Any) -> str:
    """A condition type (or an alias of :data:`COND_ALIASES`; None: t2v) -> its name."""
    if cond_type is None:
        return "t2v"
    if isinstance(cond_type, str) and cond_type in COND_ALIASES:
        return COND_ALIASES[cond_type]
    if cond_type not in COND_TYPES:
        raise ValueError(f"cond_type={cond_type!r} is not accepted; accepted: one of "
                         f"{list(COND_TYPES)} (or {list(COND_ALIASES)})")
    return cond_type


# ----------------------------------------------------------------------------- schedule
def resolution_shift(image_seq_len: float, base_shift: float = 1.0,
                     max_shift: float = 3.0) -> float:
    """The shift's spatial part: the line through (256, base_shift) and (4096, max_shift),
    at ``image_seq_len`` (tokens per latent frame)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return slope * image_seq_len + (base_shift - slope * 256)


def time_shift(alpha: float, t: torch.Tensor) -> torch.Tensor:
    """t' = alpha t / (1 + (alpha - 1) t)."""
    return alpha * t / (1 + (alpha - 1) * t)


def get_schedule(num_steps: int, image_seq_len: int, num_frames: int,
                 shift_alpha: Optional[float] = None, base_shift: float = 1.0,
                 max_shift: float = 3.0, shift: bool = True) -> list[float]:
    """The ``num_steps + 1`` times from 1 to 0 (module docstring); ``num_frames`` are latent
    frames, ``image_seq_len`` the tokens of one latent frame."""
    ts = torch.linspace(1, 0, num_steps + 1)
    if shift:
        if shift_alpha is None:
            shift_alpha = resolution_shift(image_seq_len, base_shift, max_shift)
            shift_alpha *= math.sqrt(num_frames)
        ts = time_shift(shift_alpha, ts)
    return ts.tolist()


def latent_frames(num_frames: int, temporal_reduction: int = 1, causal: bool = False) -> int:
    """Latent frames of a video of ``num_frames`` pixel frames (1 for an image)."""
    if num_frames == 1:
        return 1
    if causal:
        return (num_frames - 1) // temporal_reduction + 1
    return num_frames // temporal_reduction


# ------------------------------------------------------------------ latents and tokens
def noise_shape(batch: int, height: int, width: int, num_frames: int, patch_size: int = 2,
                channels: int = 16, spatial_compression: int = 16) -> tuple[int, ...]:
    """Shape of the initial noise (``num_frames``: latent frames; ``channels``: per latent
    pixel, ``in_channels / patch_size^2``; ``spatial_compression``: pixels per token edge)."""
    return (batch, channels, num_frames, patch_size * math.ceil(height / spatial_compression),
            patch_size * math.ceil(width / spatial_compression))


def get_noise(seeds: Sequence[int], height: int, width: int, num_frames: int,
              device: Any = "cpu", dtype: torch.dtype = torch.float32, patch_size: int = 2,
              channels: int = 16, spatial_compression: int = 16) -> torch.Tensor:
    """Standard normal noise of :func:`noise_shape`, sample ``j`` drawn in float32 on the CPU
    from a generator seeded with ``seeds[j]`` (so it does not depend on the batch or the
    device), then moved to ``device`` / ``dtype``. Upstream draws the whole batch from one
    generator on the run's device; for one sample on the CPU in float32 the draws agree."""
    shape = noise_shape(1, height, width, num_frames, patch_size, channels,
                        spatial_compression)[1:]
    zs = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)))
          for s in seeds]
    return torch.stack(zs).to(device, dtype)


def pack(x: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """[B, C, T, H, W] -> tokens [B, T (H/p) (W/p), C p p] (frame, row, column order; channel
    index ``(c p + i) p + j`` for pixel (i, j) of the patch)."""
    b, c, t, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(b, t * (h // p) * (w // p), c * p * p)


def unpack(x: torch.Tensor, height: int, width: int, num_frames: int, patch_size: int = 2,
           spatial_compression: int = 16) -> torch.Tensor:
    """Inverse of :func:`pack` for a video of ``height x width`` pixels and ``num_frames``
    latent frames: [B, L, C p p] -> [B, C, T, p ceil(H / D), p ceil(W / D)]."""
    p = patch_size
    h, w = math.ceil(height / spatial_compression), math.ceil(width / spatial_compression)
    b, n, d = x.shape
    if n != num_frames * h * w or d % (p * p):
        raise ValueError(f"unpack: tokens {tuple(x.shape)} do not fit {num_frames} frames of "
                         f"{h} x {w} tokens with patch {p}")
    c = d // (p * p)
    x = x.reshape(b, num_frames, h, w, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
    return x.reshape(b, c, num_frames, h * p, w * p)


def prepare_ids(batch: int, num_frames: int, h_tokens: int, w_tokens: int, txt_len: int,
                device: Any = "cpu", dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_ids [B, T h w, 3] = (frame, row, column) of each token in :func:`pack`'s order,
    txt_ids [B, txt_len, 3] = 0)."""
    t = torch.arange(num_frames).view(-1, 1, 1).expand(num_frames, h_tokens, w_tokens)
    r = torch.arange(h_tokens).view(1, -1, 1).expand(num_frames, h_tokens, w_tokens)
    c = torch.arange(w_tokens).view(1, 1, -1).expand(num_frames, h_tokens, w_tokens)
    ids = torch.stack([t, r, c], dim=-1).reshape(1, -1, 3).float()
    img_ids = ids.expand(batch, -1, -1).to(device, dtype)
    return img_ids, torch.zeros(batch, txt_len, 3, device=device, dtype=dtype)


# ------------------------------------------------------------------------- conditions
def condition_frames(cond_type: str, causal: bool = True) -> int:
    """Latent frames a v2v type gives: 8 (+1 causal) or, for the half types, 16 (+1)."""
    cond_type = check_cond_type(cond_type)
    return (16 if cond_type.endswith("_half") else 8) + int(causal)


def reference_pixel_frames(cond_type: str, causal: bool = True) -> int:
    """Pixel frames of a v2v reference upstream encodes: 32 (+1 causal) or, for the half
    types, 64 (+1)."""
    cond_type = check_cond_type(cond_type)
    return (64 if cond_type.endswith("_half") else 32) + int(causal)


def prepare_condition(latent_shape: Sequence[int], cond_type: str,
                      refs: Optional[Sequence[Optional[Sequence[torch.Tensor]]]] = None,
                      causal: bool = True, device: Any = "cpu",
                      dtype: torch.dtype = torch.float32
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks [B, 1, T, H, W], masked_ref [B, C, T, H, W]) of a condition type.

    ``refs[b]``: sample ``b``'s reference latents (a list of ``[C, t, H, W]``; the first and
    the last are used) or None (that sample runs as t2v). A latent with ``T == 1`` gets no
    condition. ``i2v_head``: frame 0 <- frame 0 of the first reference; ``i2v_tail``: the last
    frame <- the last reference's last frame; ``i2v_loop``: both; ``v2v_head`` / ``_tail``:
    the first / last ``k`` frames (:func:`condition_frames`) from the first reference's first /
    last ``k``.
    """
    b, c, t, h, w = latent_shape
    cond_type = check_cond_type(cond_type)
    masks = torch.zeros(b, 1, t, h, w)
    ref = torch.zeros(b, c, t, h, w)
    if cond_type == "t2v":
        return masks.to(device, dtype), ref.to(device, dtype)
    if refs is None or len(refs) != b:
        raise ValueError(f"cond_type={cond_type!r} needs one reference entry per sample "
                         f"({b}); got {None if refs is None else len(refs)}")
    for i, entry in enumerate(refs):
        if entry is None or t == 1:
            continue
        first, last = entry[0], entry[-1]
        for r in (first, last):
            if r.dim() != 4 or r.shape[0] != c or tuple(r.shape[2:]) != (h, w):
                raise ValueError(f"reference latent of sample {i}: {tuple(r.shape)} is not "
                                 f"accepted; accepted: [{c}, frames, {h}, {w}]")
        if cond_type in ("i2v_head", "i2v_loop"):
            masks[i, :, 0] = 1
            ref[i, :, 0] = first[:, 0].float()
        if cond_type in ("i2v_tail", "i2v_loop"):
            masks[i, :, -1] = 1
            ref[i, :, -1] = last[:, -1].float()
        if cond_type.startswith("v2v"):
            k = condition_frames(cond_type, causal)
            if first.shape[1] < k or t < k:
                raise ValueError(f"cond_type={cond_type!r} gives {k} latent frames; sample {i} "
                                 f"has a reference of {first.shape[1]} and a video of {t} "
                                 f"latent frames; accepted: both at least {k}")
            if "head" in cond_type:
                masks[i, :, :k] = 1
                ref[i, :, :k] = first[:, :k].float()
            else:
                masks[i, :, -k:] = 1
                ref[i, :, -k:] = first[:, -k:].float()
    return masks.to(device, dtype), ref.to(device, dtype)


# -------------------------------------------------------------------------- guidance
def oscillation_scale(scale: float, step: int, force_num: int = 10) -> float:
    """The scale on steps ``step < force_num`` and even steps, 1 on the odd steps after."""
    return scale if step < force_num or step % 2 == 0 else 1.0


def temporal_image_scale(image_scale: float, step: int, num_steps: int, frames: int,
                         tokens_per_frame: int) -> torch.Tensor:
    """Per-token image scale [1, frames * tokens_per_frame, 1] (float32): over the latent
    frames linearly from 1 up to ``linspace(image_scale, 1, num_steps + 1)[step]``."""
    upper = torch.linspace(image_scale, 1.0, num_steps + 1)[step]
    per_frame = torch.linspace(1.0, float(upper), frames)
    return per_frame.repeat_interleave(tokens_per_frame)[None, :, None]


def combine_guidance(v_c: torch.Tensor, v_u: torch.Tensor, v_0: torch.Tensor,
                     text_scale: Any, image_scale: Any) -> torch.Tensor:
    """v_0 + image_scale (v_u - v_0) + text_scale (v_c - v_u), in upstream's order."""
    return v_0 + image_scale * (v_u - v_0) + text_scale * (v_c - v_u)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


# --------------------------------------------------------------------------- sampler
@SCHEDULERS.register_module("opensora2")
class OpenSora2Sampler:
    """Open-Sora 2.0's sampler (module docstring); the keywords are upstream's
    ``sampling_option`` fields that shape the sampling (defaults as upstream's
    ``SamplingOption``), plus ``patch_size`` (upstream's top-level config key) and the shift
    line's ``base_shift`` / ``max_shift`` and the oscillation's ``force_num``."""

    def __init__(self, num_steps: int = 50, guidance: float = 4.0,
                 guidance_img: Optional[float] = None, text_osci: bool = False,
                 image_osci: bool = False, scale_temporal_osci: bool = False, shift: bool = True,
                 flow_shift: Optional[float] = None, method: str = "i2v",
                 temporal_reduction: int = 1, is_causal_vae: bool = False, patch_size: int = 2,
                 base_shift: float = 1.0, max_shift: float = 3.0, force_num: int = 10):
        def bad(key, val, accepted):
            return ValueError(f"sampling_option.{key}={val!r} is not accepted; accepted: "
                              f"{accepted}")
        if not _is_int(num_steps, 1):
            raise bad("num_steps", num_steps, "an int >= 1")
        if not _is_number(guidance):
            raise bad("guidance", guidance, "a finite number")
        if method not in METHODS:
            raise bad("method", method, f"one of {list(METHODS)}")
        if method == "i2v" and not _is_number(guidance_img):
            raise bad("guidance_img", guidance_img, "a finite number (method 'i2v' guides the "
                      "image condition too)")
        if guidance_img is not None and not _is_number(guidance_img):
            raise bad("guidance_img", guidance_img, "None or a finite number")
        for key, val in (("text_osci", text_osci), ("image_osci", image_osci),
                         ("scale_temporal_osci", scale_temporal_osci), ("shift", shift),
                         ("is_causal_vae", is_causal_vae)):
            if not isinstance(val, bool):
                raise bad(key, val, "True or False")
        if flow_shift is not None and (not _is_number(flow_shift) or flow_shift <= 0):
            raise bad("flow_shift", flow_shift, "None or a number > 0")
        for key, val in (("temporal_reduction", temporal_reduction),
                         ("patch_size", patch_size)):
            if not _is_int(val, 1):
                raise bad(key, val, "an int >= 1")
        if not _is_int(force_num, 0):
            raise bad("force_num", force_num, "an int >= 0")
        for key, val in (("base_shift", base_shift), ("max_shift", max_shift)):
            if not _is_number(val):
                raise bad(key, val, "a finite number")
        self.num_steps, self.guidance, self.guidance_img = num_steps, float(guidance), \
            None if guidance_img is None else float(guidance_img)
        self.text_osci, self.image_osci = text_osci, image_osci
        self.scale_temporal_osci, self.shift, self.flow_shift = scale_temporal_osci, shift, \
            None if flow_shift is None else float(flow_shift)
        self.method, self.temporal_reduction = method, temporal_reduction
        self.is_causal_vae, self.patch_size = is_causal_vae, patch_size
        self.base_shift, self.max_shift = float(base_shift), float(max_shift)
        self.force_num = force_num

    # names the tools print (as the 1.x sampler's)
    @property
    def num_sampling_steps(self) -> int:
        return self.num_steps

    @property
    def cfg_scale(self) -> float:
        return self.guidance

    @property
    def branches(self) -> int:
        """Rows of the model batch per sample: 3 (i2v guidance) or 1 (distilled)."""
        return 3 if self.method == "i2v" else 1

    def latent_frames(self, num_frames: int) -> int:
        return latent_frames(num_frames, self.temporal_reduction, self.is_causal_vae)

    def timesteps(self, image_seq_len: int, num_latent_frames: int) -> list[float]:
        """The ``num_steps + 1`` times of a run (:func:`get_schedule`)."""
        return get_schedule(self.num_steps, image_seq_len, num_latent_frames,
                            shift_alpha=self.flow_shift, base_shift=self.base_shift,
                            max_shift=self.max_shift, shift=self.shift)

    def scales(self, step: int, cond_type: str, frames: int, tokens_per_frame: int
               ) -> tuple[float, Any]:
        """(text scale, image scale) of ``step``; the image scale is a float or a per-token
        tensor [1, L, 1] (float32) under temporal scaling."""
        text = oscillation_scale(self.guidance, step, self.force_num) if self.text_osci \
            else self.guidance
        image = oscillation_scale(self.guidance_img, step, self.force_num) \
            if self.image_osci else self.guidance_img
        if image > 1.0 and self.scale_temporal_osci and "i2v" in check_cond_type(cond_type):
            image = temporal_image_scale(image, step, self.num_steps, frames, tokens_per_frame)
        return text, image

    @torch.no_grad()
    def sample(self, model, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor,
               txt_ids: torch.Tensor, y_vec: torch.Tensor, timesteps: Sequence[float],
               frames: int, masks: Optional[torch.Tensor] = None,
               masked_ref: Optional[torch.Tensor] = None, cond_type: str = "t2v",
               progress: bool = False) -> torch.Tensor:
        """Denoise the packed noise ``img`` [B, L, C] along ``timesteps`` (the
        ``num_steps + 1`` values of :meth:`timesteps`); ``frames``: latent frames of the
        video (L = frames x tokens per frame).

        ``method="i2v"``: ``img_ids``, ``txt``, ``txt_ids``, ``y_vec`` are the 3B rows of the
        guidance batch (prompts, negatives, negatives), ``masks`` / ``masked_ref`` the
        [B, 1 / C', T, H, W] condition of :func:`prepare_condition`. ``"distill"``: B rows,
        no condition. Returns the packed latent [B, L, C]."""
        b, n_tok = img.shape[:2]
        k = self.branches
        if img_ids.shape[0] != k * b or txt.shape[0] != k * b or y_vec.shape[0] != k * b:
            raise ValueError(f"method {self.method!r}: the text inputs need {k} x {b} rows; got "
                             f"img_ids {img_ids.shape[0]}, txt {txt.shape[0]}, y_vec "
                             f"{y_vec.shape[0]}")
        if len(timesteps) != self.num_steps + 1:
            raise ValueError(f"timesteps: {len(timesteps)} values for {self.num_steps} steps; "
                             f"accepted: num_steps + 1")
        if n_tok % frames:
            raise ValueError(f"{n_tok} tokens do not split into {frames} frames")
        cond = None
        if k == 3:
            if masks is None or masked_ref is None:
                raise ValueError("method 'i2v' needs masks and masked_ref (prepare_condition)")
            c = pack(torch.cat([masks, masked_ref], dim=1), self.patch_size).to(img)
            cond = torch.cat([c, c, torch.zeros_like(c)])
        guidance_vec = torch.full((k * b,), self.guidance, device=img.device, dtype=img.dtype)
        manager = get_cache_manager(model)
        run = manager.session(num_steps=self.num_steps, timesteps=list(timesteps[:-1])) \
            if manager is not None else contextlib.nullcontext()
        steps = range(self.num_steps)
        with run:
            for i in tqdm(steps, desc="sampling", disable=not progress, leave=False):
                t_curr, t_prev = timesteps[i], timesteps[i + 1]
                t_vec = torch.full((k * b,), t_curr, device=img.device, dtype=img.dtype)
                x = img if k == 1 else torch.cat([img, img, img])
                kwargs = dict(img=x, img_ids=img_ids, txt=txt, txt_ids=txt_ids,
                              timesteps=t_vec, y_vec=y_vec, guidance=guidance_vec)
                if cond is not None:
                    kwargs["cond"] = cond
                pred = model(**kwargs)
                if k == 3:
                    text_gs, image_gs = self.scales(i, cond_type, frames, n_tok // frames)
                    if isinstance(image_gs, torch.Tensor):
                        image_gs = image_gs.to(pred.device, pred.dtype)
                    v_c, v_u, v_0 = pred.chunk(3, dim=0)
                    pred = combine_guidance(v_c, v_u, v_0, text_gs, image_gs)
                img = img + (t_prev - t_curr) * pred
        return img


__all__ = ["OpenSora2Sampler", "COND_TYPES", "COND_ALIASES", "METHODS", "check_cond_type",
           "resolution_shift", "time_shift", "get_schedule", "latent_frames", "noise_shape",
           "get_noise", "pack", "unpack", "prepare_ids", "condition_frames",
           "reference_pixel_frames", "prepare_condition", "oscillation_scale",
           "temporal_image_scale", "combine_guidance"]
