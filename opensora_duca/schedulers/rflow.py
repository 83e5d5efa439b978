"""Rectified-flow sampler ("rflow"), as Open-Sora 1.2 and 1.3 sample and train.

Timesteps t_i = (1 - i/n) * 1000, optionally transformed by t' = r t / (1 + (r - 1) t) (on
t/1000) with r = sqrt(H*W / 512^2) * sqrt(frames) * transform_scale, where frames is
num_frames // 17 * 5 (``transform_version="1.2"``) or (num_frames - 1) // 4 with
transform_scale applied to videos only (``"1.3"``); an image (1 frame, or
``scale_temporal=False``) counts 1 frame. Where that frame count is 0 (2-16 frames in 1.2,
2-4 in 1.3) r is 0, as upstream's: t' = 0 below t = 1000, and t = 1000 (0/0, NaN upstream)
is refused with a ValueError, which every sampling run meets at :meth:`RFlow.timesteps`,
before the model runs. Each step runs the model once on the
classifier-free-guidance batch [z, z] with captions [y, y_null], combines
v = v_u + g_i (v_c - v_u) and moves z += v * (t_i - t_{i+1}) / 1000 (t_n = 0).

Open-Sora 1.3 options: ``use_oscillation_guidance`` (g_i = cfg_scale for i < force_num and
even i, 1 otherwise) and ``use_flaw_fix`` (v *= 0.7 std(v_c) / std(v) + 0.3, standard
deviations over each sample); for training, ``uniform_over_threshold`` resamples transformed
video timesteps above the threshold uniformly in (threshold, 1) * 1000.

Open-Sora 1.3 image / video conditioning (i2v / v2v: :meth:`RFlow.sample` with a non-empty
``mask_index``, the latent frames given, and ``z_cond``, the reference latents there): each
step runs the model once on [z, z, z] with captions [y, y_null, y_null], ``cond`` =
[z_cond, z_cond, 0], ``cond_mask`` [m, m, m], ``mask_index`` and the null caption as
``y_null`` for all 3B rows, and guides three ways,
v = v_none + g_img (v_img - v_none) + g_txt (v_c - v_img), with v_c (text and image), v_img
(image only) and v_none (neither) the three thirds of the output. g_txt is the text scale
and g_img ``image_cfg_scale``, each oscillated (as g_i above) when its switch is on. With the
scheduler option ``scale_image_weight`` and g_img > ``initial_image_scale`` (default 1), g_img
becomes a per-frame weight (:meth:`RFlow.image_guidance_weights`): linear over the frames
from ``initial_image_scale`` at frame 0 up to a top value that falls linearly over the steps
from g_img (step 0) to ``initial_image_scale`` (last step); its values are rounded to the
latents' dtype, as upstream's. ``use_flaw_fix`` is not applied to three-way steps (upstream
applies it to two-way steps only). With ``use_sdedit`` the given frames of z (z_cond_mask ==
1) are replaced before every step by add_noise(z_cond, fresh standard normal noise, t_i).
Open-Sora 1.2's frame conditioning (``x_cond`` / ``cond_mask``) and CFG parallelism are
refused with it.

Dtypes, as upstream 1.2 / 1.3: the timesteps are float32 throughout (the model gets them in
float32 and rounds them to its own dtype inside, as upstream's STDiT3 does), and each step's
update ``z + v * dt`` is computed in float32 (upstream's dt is a float32 tensor of batch
shape, so its product with v is float32 whatever the model returns): the latents a bf16 / fp16
run starts from become float32 at the first step, and consecutive timesteps stay distinct
(rounded to bf16, those near 1000 of a 300-step or a transformed 720p schedule coincide). The
model's input is cast to its dtype by the model, so its compute dtype is unchanged.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

from ..parallel.cfg import CFGParallel
from ..registry import SCHEDULERS

TRANSFORM_VERSIONS = ("1.2", "1.3")


def frame_factor(num_frames: int, version: str = "1.2", scale_temporal: bool = True) -> int:
    """The frame count the timestep transform uses: 1 for an image (1 frame, or
    ``scale_temporal=False``), else ``num_frames // 17 * 5`` (1.2) or ``(num_frames - 1) // 4``
    (1.3). It is 0 for 2-16 frames (1.2) and 2-4 frames (1.3), as upstream computes it."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r} is not accepted by the timestep transform; "
                         f"accepted: an int >= 1 (pixel frames)")
    if num_frames == 1 or not scale_temporal:
        return 1
    return (num_frames - 1) // 4 if version == "1.3" else num_frames // 17 * 5


def transform_ratio(height: float, width: float, num_frames: int, scale: float = 1.0,
                    version: str = "1.2", scale_temporal: bool = True,
                    base_resolution: int = 512 * 512) -> tuple[float, bool]:
    """(r, image): r of the timestep transform (module docstring) and whether the video counts
    as an image (1 frame, or scale_temporal=False). r is 0 where upstream's frame factor is 0
    (:func:`frame_factor`); :func:`timestep_transform` refuses the timestep where that gives
    0/0."""
    image = num_frames == 1 or not scale_temporal
    frames = frame_factor(num_frames, version, scale_temporal)
    ratio = (float(height) * float(width) / base_resolution) ** 0.5 * frames ** 0.5
    if version == "1.2" or not image:
        ratio = ratio * scale
    return ratio, image


def degenerate_frames_error(num_frames: int, version: str, num_timesteps: int) -> ValueError:
    formula = "(num_frames - 1) // 4" if version == "1.3" else "num_frames // 17 * 5"
    least = 5 if version == "1.3" else 17
    return ValueError(
        f"num_frames={num_frames} is not accepted with use_timestep_transform and "
        f"transform_version={version!r}: the transform's frame factor {formula} is 0, so the "
        f"timestep t={num_timesteps} maps to 0/0 (NaN, as upstream computes it); accepted: "
        f"num_frames 1 or >= {least}, or scale_temporal=False (the video counts as one frame), "
        f"or use_timestep_transform=False")


def timestep_transform(t: torch.Tensor, height: float, width: float, num_frames: int,
                       base_resolution: int = 512 * 512, scale: float = 1.0,
                       num_timesteps: int = 1000, version: str = "1.2",
                       scale_temporal: bool = True) -> torch.Tensor:
    """t' = r t / (1 + (r - 1) t) on t / num_timesteps, times num_timesteps. With r = 0 (a
    frame factor of 0, see :func:`frame_factor`) t' is 0 below num_timesteps, as upstream's,
    and t = num_timesteps (0/0 there, NaN upstream) raises ValueError."""
    ratio, _ = transform_ratio(height, width, num_frames, scale, version, scale_temporal,
                               base_resolution)
    if ratio == 0 and bool((t == num_timesteps).any()):
        raise degenerate_frames_error(num_frames, version, num_timesteps)
    t = t / num_timesteps
    return ratio * t / (1 + (ratio - 1) * t) * num_timesteps


def oscillation_scale(cfg: float, step: int, force_num: int) -> float:
    """Open-Sora 1.3's oscillation guidance: cfg on the first force_num steps and on even
    steps, 1 (no guidance) on the odd steps after them."""
    return cfg if step < force_num or step % 2 == 0 else 1.0


def fix_guidance_flaw(v: torch.Tensor, v_cond: torch.Tensor) -> torch.Tensor:
    """Open-Sora 1.3's flaw fix: rescale the guided velocity towards the conditional one's
    standard deviation (per sample): v * (0.7 std(v_cond) / std(v) + 0.3)."""
    dims = list(range(1, v.dim()))
    factor = v_cond.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True)
    return v * (0.7 * factor + 0.3)


def _step(z: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
          num_timesteps: int) -> torch.Tensor:
    """``z + v * (t - t_next) / num_timesteps`` in float32 (or wider), as upstream's update,
    whose float32 dt of batch shape promotes the product: the latents become float32."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    dt = (t.float() - t_next.float()) / num_timesteps
    return z.to(dtype) + v.to(dtype) * dt


def _is_finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@SCHEDULERS.register_module("rflow")
class RFlow:
    def __init__(self, num_sampling_steps: int = 30, num_timesteps: int = 1000,
                 cfg_scale: float = 4.0, use_timestep_transform: bool = False,
                 transform_scale: float = 1.0, use_discrete_timesteps: bool = False,
                 sample_method: str = "uniform", loc: float = 0.0, scale: float = 1.0,
                 transform_version: str = "1.2", scale_temporal: bool = True,
                 use_oscillation_guidance: bool = False, use_flaw_fix: bool = False,
                 force_num: int = 10, uniform_over_threshold: Optional[float] = None,
                 scale_image_weight: bool = False, initial_image_scale: float = 1.0):
        if not isinstance(num_sampling_steps, int) or num_sampling_steps < 1:
            raise ValueError(f"scheduler num_sampling_steps={num_sampling_steps!r}: must be an "
                             f"integer >= 1")
        if sample_method not in ("uniform", "logit-normal"):
            raise ValueError(f"scheduler sample_method={sample_method!r}; accepted: "
                             f"['uniform', 'logit-normal']")
        if transform_version not in TRANSFORM_VERSIONS:
            raise ValueError(f"scheduler transform_version={transform_version!r}; accepted: "
                             f"{list(TRANSFORM_VERSIONS)}")
        for key, val in (("scale_temporal", scale_temporal),
                         ("use_oscillation_guidance", use_oscillation_guidance),
                         ("use_flaw_fix", use_flaw_fix),
                         ("scale_image_weight", scale_image_weight)):
            if not isinstance(val, bool):
                raise ValueError(f"scheduler {key}={val!r}; accepted: True or False")
        if not _is_finite_number(initial_image_scale):
            raise ValueError(f"scheduler initial_image_scale={initial_image_scale!r}; accepted: "
                             f"a finite number (the image guidance weight of the first frame)")
        if not _is_finite_number(transform_scale) or transform_scale <= 0:
            raise ValueError(f"scheduler transform_scale={transform_scale!r}; accepted: a "
                             f"finite number > 0 (it scales the timestep transform's ratio; "
                             f"<= 0 gives negative or NaN timesteps)")
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) \
                or num_timesteps < 1:
            raise ValueError(f"scheduler num_timesteps={num_timesteps!r}; accepted: an integer "
                             f">= 1 (1000 in Open-Sora)")
        if not _is_finite_number(cfg_scale):
            raise ValueError(f"scheduler cfg_scale={cfg_scale!r}; accepted: a finite number")
        if isinstance(force_num, bool) or not isinstance(force_num, int) or force_num < 0:
            raise ValueError(f"scheduler force_num={force_num!r}: must be an integer >= 0")
        thr = uniform_over_threshold
        if thr is not None and (isinstance(thr, bool) or not isinstance(thr, (int, float))
                                or not 0 <= thr < 1):
            raise ValueError(f"scheduler uniform_over_threshold={uniform_over_threshold!r}; "
                             f"accepted: None or a number in [0, 1)")
        self.transform_version, self.scale_temporal = transform_version, scale_temporal
        self.use_oscillation_guidance, self.use_flaw_fix = use_oscillation_guidance, use_flaw_fix
        self.force_num, self.uniform_over_threshold = force_num, uniform_over_threshold
        self.num_sampling_steps = num_sampling_steps
        self.num_timesteps = num_timesteps
        self.cfg_scale = cfg_scale
        self.use_timestep_transform = use_timestep_transform
        self.transform_scale = transform_scale
        self.use_discrete_timesteps = use_discrete_timesteps
        self.sample_method, self.loc, self.scale = sample_method, loc, scale
        self.scale_image_weight = scale_image_weight
        self.initial_image_scale = float(initial_image_scale)

    # ------------------------------------------------------------- sampling
    def timesteps(self, height=None, width=None, num_frames: int = 1, device="cpu"):
        n = self.num_sampling_steps
        ts = torch.tensor([(1.0 - i / n) * self.num_timesteps for i in range(n)],
                          dtype=torch.float32, device=device)
        if self.use_discrete_timesteps:
            ts = ts.round()
        if self.use_timestep_transform:
            if height is None or width is None:
                raise ValueError("use_timestep_transform needs the video height and width")
            ts = timestep_transform(ts, height, width, num_frames, scale=self.transform_scale,
                                    num_timesteps=self.num_timesteps,
                                    version=self.transform_version,
                                    scale_temporal=self.scale_temporal)
        return ts

    def image_guidance_weights(self, scale: float, step: int, num_steps: int,
                               num_frames: int) -> torch.Tensor:
        """``scale_image_weight``'s per-frame image guidance scale at ``step`` (float32,
        [num_frames]), as upstream 1.3 computes it: the last frame's weight falls linearly over
        the steps, from ``scale`` at step 0 to ``initial_image_scale`` at the last step; within
        a step the weights rise linearly over the frames, from ``initial_image_scale`` at frame
        0 to that value. The sampler uses it only where ``scale > initial_image_scale``."""
        upper = torch.linspace(scale, self.initial_image_scale, num_steps,
                               dtype=torch.float32)[step]
        return torch.linspace(self.initial_image_scale, upper.item(), num_frames,
                              dtype=torch.float32)

    @torch.no_grad()
    def sample(self, model, z: torch.Tensor, y: torch.Tensor, y_null: torch.Tensor,
               mask: Optional[torch.Tensor] = None, additional_args: Optional[dict] = None,
               x_cond: Optional[torch.Tensor] = None, cond_mask: Optional[torch.Tensor] = None,
               height=None, width=None, num_frames: int = 1, progress: bool = True,
               guidance_scale: Optional[float] = None,
               on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
               cfg_parallel: Optional[CFGParallel] = None,
               z_cond: Optional[torch.Tensor] = None, z_cond_mask: Optional[torch.Tensor] = None,
               mask_index: Optional[Sequence[int]] = None,
               image_cfg_scale: Optional[float] = None, use_sdedit: bool = False,
               use_oscillation_guidance_for_text: Optional[bool] = None,
               use_oscillation_guidance_for_image: Optional[bool] = None,
               generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
        """Denoise ``z`` [B, C, T, H, W] from noise; ``y``/``y_null`` [B, 1, L, Cy].

        ``x_cond`` [B, C, T, H, W] with ``cond_mask`` [B, T] in [0, 1] holds frame ``j`` at its
        reference latent while t > cond_mask[:, j] * 1000 (image-to-video / extension, as
        Open-Sora 1.2), and passes the matching ``x_mask`` to the model.

        Open-Sora 1.3 image / video conditioning: a non-empty ``mask_index`` (the latent frames
        given) with ``z_cond`` [B, C, T, H, W] (the reference latents there; multiplied by
        ``z_cond_mask``, which defaults to 1 on the ``mask_index`` frames and 0 elsewhere) runs
        the three-way guidance of the module docstring: ``image_cfg_scale`` (default: the text
        scale), ``use_sdedit``, and the oscillation switches
        ``use_oscillation_guidance_for_text`` / ``_for_image`` (default: the scheduler's
        ``use_oscillation_guidance``; the text one also applies to the two-way guidance). With
        ``mask_index`` None or empty the run is the two-way one and ``z_cond``,
        ``z_cond_mask``, ``image_cfg_scale`` and ``use_sdedit`` are not used (as upstream).
        ``generators``: one CPU ``torch.Generator`` per sample for SDEdit's noise (drawn in
        float32 and moved to z's device and dtype), so a sample's noise does not depend on its
        batch-mates; default: ``torch.randn_like`` on z's device (the global generator, as
        upstream).

        ``cfg_parallel`` (:mod:`opensora_duca.parallel.cfg`): the model runs on this rank's half
        of the CFG batch only (``z`` with ``y`` or ``y_null``); the halves of its output are
        gathered with one collective per step and every rank guides the same way. It is refused
        with the three-way guidance.
        """
        mask_index, z_cond_mask = self.check_image_conditioning(
            z, mask_index, z_cond, z_cond_mask, image_cfg_scale, use_sdedit,
            use_oscillation_guidance_for_text, use_oscillation_guidance_for_image,
            x_cond=x_cond, cond_mask=cond_mask, cfg_parallel=cfg_parallel,
            generators=generators)
        cfg = self.cfg_scale if guidance_scale is None else guidance_scale
        osc_text = self.use_oscillation_guidance if use_oscillation_guidance_for_text is None \
            else use_oscillation_guidance_for_text
        additional_args = dict(additional_args or {})
        ts = self.timesteps(height, width, num_frames, device=z.device)
        if mask_index:
            osc_image = self.use_oscillation_guidance \
                if use_oscillation_guidance_for_image is None \
                else use_oscillation_guidance_for_image
            return self._sample_three_way(
                model, z, y, y_null, mask, additional_args, ts, mask_index, z_cond, z_cond_mask,
                cfg, cfg if image_cfg_scale is None else image_cfg_scale, use_sdedit, osc_text,
                osc_image, progress, on_step, generators)
        copies = 2 if cfg_parallel is None else 1  # of z in the model's batch
        b = z.shape[0]
        if cfg_parallel is None:
            y_in = torch.cat([y, y_null], 0)
        else:
            y_in = cfg_parallel.half(torch.cat([y, y_null], 0), b, "y")
        m_in = mask
        if mask is not None and mask.shape[0] == y.shape[0]:
            m_in = torch.cat([mask] * copies, 0)
        elif mask is not None and cfg_parallel is not None:
            m_in = cfg_parallel.half(mask, b, "mask")
        noise_added = None
        if cond_mask is not None:
            if x_cond is None:
                raise ValueError("cond_mask needs x_cond (the reference latents)")
            cond_mask = cond_mask.to(z.device, torch.float32)
            noise_added = torch.zeros_like(cond_mask, dtype=torch.bool)
        it = tqdm(range(len(ts)), desc="sampling", leave=False, disable=not progress)
        for i in it:
            t = ts[i]
            if cond_mask is not None:
                # frames whose mask value m satisfies t <= m*1000 follow the current timestep
                follow = cond_mask * self.num_timesteps >= t
                start = follow & ~noise_added  # reference frames that start following now
                if bool(start.any()):
                    noisy = self.add_noise(x_cond, torch.randn_like(x_cond), t.expand(z.shape[0]))
                    z = torch.where(start[:, None, :, None, None], noisy, z)
                noise_added = follow
                z = torch.where(follow[:, None, :, None, None], z, x_cond)
                additional_args["x_mask"] = torch.cat([follow] * copies, 0)
            z_in = torch.cat([z] * copies, 0)
            t_in = t.expand(z_in.shape[0])  # float32, as upstream's
            out = model(z_in, t_in, y_in, mask=m_in, **additional_args)
            v = out[:, : z.shape[1]] if out.shape[1] != z.shape[1] else out
            if cfg_parallel is not None:
                v = cfg_parallel.combine(v)
            v_c, v_u = v.chunk(2, dim=0)
            g = oscillation_scale(cfg, i, self.force_num) if osc_text else cfg
            v = v_u + g * (v_c - v_u)
            if self.use_flaw_fix:
                v = fix_guidance_flaw(v, v_c)
            t_next = ts[i + 1] if i + 1 < len(ts) else torch.zeros_like(t)
            z_new = _step(z, v, t, t_next, self.num_timesteps)
            if cond_mask is not None:
                z_new = torch.where(noise_added[:, None, :, None, None], z_new, z)
            z = z_new
            if on_step is not None:
                on_step(i, z)
        return z

    def check_image_conditioning(self, z, mask_index=None, z_cond=None, z_cond_mask=None,
                                 image_cfg_scale=None, use_sdedit=False,
                                 use_oscillation_guidance_for_text=None,
                                 use_oscillation_guidance_for_image=None, x_cond=None,
                                 cond_mask=None, cfg_parallel=None, generators=None):
        """Check :meth:`sample`'s Open-Sora 1.3 conditioning arguments before anything runs;
        return ``mask_index`` as a list of ints ([] for None) and ``z_cond_mask`` (built from
        ``mask_index`` when None and ``mask_index`` is non-empty)."""
        if not isinstance(use_sdedit, bool):
            raise ValueError(f"sample use_sdedit={use_sdedit!r}; accepted: True or False")
        for key, val in (("use_oscillation_guidance_for_text", use_oscillation_guidance_for_text),
                         ("use_oscillation_guidance_for_image",
                          use_oscillation_guidance_for_image)):
            if val is not None and not isinstance(val, bool):
                raise ValueError(f"sample {key}={val!r}; accepted: None (the scheduler's "
                                 f"use_oscillation_guidance), True or False")
        if image_cfg_scale is not None and not _is_finite_number(image_cfg_scale):
            raise ValueError(f"sample image_cfg_scale={image_cfg_scale!r}; accepted: None (the "
                             f"text guidance scale) or a finite number")
        if generators is not None and (
                not isinstance(generators, (list, tuple)) or len(generators) != z.shape[0]
                or not all(isinstance(g, torch.Generator) for g in generators)):
            raise ValueError(f"sample generators={generators!r}; accepted: None or one "
                             f"torch.Generator per sample ({z.shape[0]})")
        if mask_index is None:
            return [], z_cond_mask
        frames = z.shape[2]
        idx = mask_index.tolist() if isinstance(mask_index, torch.Tensor) else mask_index
        if not isinstance(idx, (list, tuple)) or len(set(idx)) != len(idx) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < frames for i in idx):
            raise ValueError(f"sample mask_index={mask_index!r}; accepted: None or distinct latent "
                             f"frame indices in 0..{frames - 1}")
        idx = list(idx)
        if not idx:
            return idx, z_cond_mask
        if cfg_parallel is not None:
            raise ValueError(f"cfg_parallel=2 is not accepted with i2v / v2v guidance "
                             f"(mask_index={idx}): its three-way batch (text + image, image, "
                             f"neither) does not split into the two CFG halves; accepted: "
                             f"cfg_parallel=1")
        if x_cond is not None or cond_mask is not None:
            raise ValueError(f"mask_index={idx} (Open-Sora 1.3 i2v / v2v) is not accepted together "
                             f"with x_cond / cond_mask (Open-Sora 1.2 frame conditioning); "
                             f"accepted: one of the two")
        shape = tuple(z.shape)
        for key, val in (("z_cond", z_cond), ("z_cond_mask", z_cond_mask)):
            if (val is not None or key == "z_cond") and (
                    not isinstance(val, torch.Tensor) or tuple(val.shape) != shape):
                got = tuple(val.shape) if isinstance(val, torch.Tensor) else val
                raise ValueError(f"sample {key}={got!r} with mask_index={idx}; accepted: a "
                                 f"tensor shaped like z {shape}"
                                 + (" (or None: 1 on the mask_index frames)"
                                    if key == "z_cond_mask" else ""))
        if z_cond_mask is None:
            z_cond_mask = torch.zeros_like(z)
            z_cond_mask[:, :, idx] = 1
        return idx, z_cond_mask

    def _sample_three_way(self, model, z, y, y_null, mask, additional_args, ts, mask_index,
                          z_cond, z_cond_mask, text_scale, image_scale, use_sdedit, osc_text,
                          osc_image, progress, on_step, generators=None):
        """Open-Sora 1.3's i2v / v2v sampling loop (module docstring)."""
        b, c = z.shape[:2]
        z_cond_mask = z_cond_mask.to(z.dtype)
        z_cond = (z_cond.to(z.dtype) * z_cond_mask)
        given = z_cond_mask == 1  # the frames SDEdit overwrites
        y_in = torch.cat([y, y_null, y_null], 0)
        m_in = torch.cat([mask] * 3, 0) if mask is not None and mask.shape[0] == b else mask
        cond_in = torch.cat([z_cond, z_cond, torch.zeros_like(z_cond)], 0)
        cond_mask_in = torch.cat([z_cond_mask] * 3, 0)
        y_null_in = torch.cat([y_null] * 3, 0)  # the null caption only, never a negative one
        it = tqdm(range(len(ts)), desc="sampling", leave=False, disable=not progress)
        for i in it:
            t = ts[i]
            if use_sdedit:  # the given frames restart from fresh noise at this timestep
                # add_noise's value, in upstream's operation order: keep x0 + (1 - keep) noise
                keep = 1 - t / self.num_timesteps
                if generators is None:
                    noise = torch.randn_like(z_cond)
                else:
                    noise = torch.stack([torch.randn(z_cond.shape[1:], generator=g,
                                                     dtype=torch.float32) for g in generators])
                    noise = noise.to(z_cond.device, z_cond.dtype)
                # in float32, as upstream's add_noise (its weights are float32 of z's shape)
                noisy = keep * z_cond.float() + (1 - keep) * noise.float()
                z = torch.where(given, noisy, z)
            g_text = oscillation_scale(text_scale, i, self.force_num) if osc_text else text_scale
            g_image = oscillation_scale(image_scale, i, self.force_num) if osc_image \
                else image_scale
            if self.scale_image_weight and g_image > self.initial_image_scale:
                g_image = self.image_guidance_weights(g_image, i, len(ts), z.shape[2]).to(
                    z.device, z.dtype).view(1, 1, -1, 1, 1)
            z_in = torch.cat([z] * 3, 0)
            t_in = t.expand(z_in.shape[0])  # float32, as upstream's
            out = model(z_in, t_in, y_in, mask=m_in, cond=cond_in, cond_mask=cond_mask_in,
                        mask_index=list(mask_index), y_null=y_null_in, **additional_args)
            v = out[:, :c] if out.shape[1] != c else out
            v_c, v_image, v_none = v.chunk(3, dim=0)
            v = v_none + g_image * (v_image - v_none) + g_text * (v_c - v_image)
            t_next = ts[i + 1] if i + 1 < len(ts) else torch.zeros_like(t)
            z = _step(z, v, t, t_next, self.num_timesteps)
            if on_step is not None:
                on_step(i, z)
        return z

    # ------------------------------------------------------------- training
    def sample_t(self, batch: int, device="cpu", generator=None, height=None, width=None,
                 num_frames: Optional[int] = None) -> torch.Tensor:
        """Training timesteps in [0, num_timesteps): uniform or logit-normal. Given the video
        size (height, width, num_frames) and use_timestep_transform, transformed as sampling
        does, then (uniform_over_threshold, videos only) resampled above the threshold."""
        if self.sample_method == "logit-normal":
            u = torch.randn(batch, device=device, generator=generator) * self.scale + self.loc
            t = torch.sigmoid(u) * self.num_timesteps
        else:
            t = torch.rand(batch, device=device, generator=generator) * self.num_timesteps
        if not self.use_timestep_transform or height is None or width is None \
                or num_frames is None:
            return t
        t = timestep_transform(t, height, width, num_frames, scale=self.transform_scale,
                               num_timesteps=self.num_timesteps,
                               version=self.transform_version,
                               scale_temporal=self.scale_temporal)
        image = transform_ratio(height, width, num_frames, version=self.transform_version,
                                scale_temporal=self.scale_temporal)[1]
        thr = self.uniform_over_threshold
        if thr is None or image:
            return t
        u = torch.rand(batch, device=device, generator=generator)
        over = t > thr * self.num_timesteps
        return torch.where(over, (u * (1 - thr) + thr) * self.num_timesteps, t)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tau = (t / self.num_timesteps).view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - tau) * x0 + tau * noise

    def training_loss(self, model, x0: torch.Tensor, model_kwargs: dict, noise=None, t=None):
        """Rectified-flow loss: ``model(x_t, t, **model_kwargs)`` at
        ``x_t = (1 - t/1000) x0 + t/1000 noise``; the MSE (in float32) between its first
        ``x0.shape[1]`` output channels and the velocity ``x0 - noise``. ``noise`` defaults to
        standard normal, ``t`` to :meth:`sample_t`."""
        noise = torch.randn_like(x0) if noise is None else noise
        t = self.sample_t(x0.shape[0], x0.device) if t is None else t
        out = model(self.add_noise(x0, noise, t), t, **model_kwargs)
        v = out[:, : x0.shape[1]]
        return ((v.float() - (x0 - noise).float()) ** 2).mean()
