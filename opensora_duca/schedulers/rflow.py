"""Rectified-flow sampler ("rflow"), as Open-Sora 1.2 and 1.3 sample and train.

Timesteps t_i = (1 - i/n) * 1000, optionally transformed by t' = r t / (1 + (r - 1) t) (on
t/1000) with r = sqrt(H*W / 512^2) * sqrt(frames) * transform_scale, where frames is
num_frames // 17 * 5 (``transform_version="1.2"``) or (num_frames - 1) // 4 with
transform_scale applied to videos only (``"1.3"``); an image (1 frame, or
``scale_temporal=False``) counts 1 frame. Each step runs the model once on the
classifier-free-guidance batch [z, z] with captions [y, y_null], combines
v = v_u + g_i (v_c - v_u) and moves z += v * (t_i - t_{i+1}) / 1000 (t_n = 0).

Open-Sora 1.3 options: ``use_oscillation_guidance`` (g_i = cfg_scale for i < force_num and
even i, 1 otherwise) and ``use_flaw_fix`` (v *= 0.7 std(v_c) / std(v) + 0.3, standard
deviations over each sample); for training, ``uniform_over_threshold`` resamples transformed
video timesteps above the threshold uniformly in (threshold, 1) * 1000.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm import tqdm

from ..registry import SCHEDULERS

TRANSFORM_VERSIONS = ("1.2", "1.3")


def transform_ratio(height: float, width: float, num_frames: int, scale: float = 1.0,
                    version: str = "1.2", scale_temporal: bool = True,
                    base_resolution: int = 512 * 512) -> float:
    """r of the timestep transform (module docstring); it also tells images (returned second:
    True for 1 frame or scale_temporal=False) from videos."""
    image = num_frames == 1 or not scale_temporal
    if image:
        frames = 1
    elif version == "1.3":
        frames = (num_frames - 1) // 4
    else:
        frames = num_frames // 17 * 5
    ratio = (float(height) * float(width) / base_resolution) ** 0.5 * max(frames, 1) ** 0.5
    if version == "1.2" or not image:
        ratio = ratio * scale
    return ratio, image


def timestep_transform(t: torch.Tensor, height: float, width: float, num_frames: int,
                       base_resolution: int = 512 * 512, scale: float = 1.0,
                       num_timesteps: int = 1000, version: str = "1.2",
                       scale_temporal: bool = True) -> torch.Tensor:
    t = t / num_timesteps
    ratio, _ = transform_ratio(height, width, num_frames, scale, version, scale_temporal,
                               base_resolution)
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


@SCHEDULERS.register_module("rflow")
class RFlow:
    def __init__(self, num_sampling_steps: int = 30, num_timesteps: int = 1000,
                 cfg_scale: float = 4.0, use_timestep_transform: bool = False,
                 transform_scale: float = 1.0, use_discrete_timesteps: bool = False,
                 sample_method: str = "uniform", loc: float = 0.0, scale: float = 1.0,
                 transform_version: str = "1.2", scale_temporal: bool = True,
                 use_oscillation_guidance: bool = False, use_flaw_fix: bool = False,
                 force_num: int = 10, uniform_over_threshold: Optional[float] = None):
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
                         ("use_flaw_fix", use_flaw_fix)):
            if not isinstance(val, bool):
                raise ValueError(f"scheduler {key}={val!r}; accepted: True or False")
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

    @torch.no_grad()
    def sample(self, model, z: torch.Tensor, y: torch.Tensor, y_null: torch.Tensor,
               mask: Optional[torch.Tensor] = None, additional_args: Optional[dict] = None,
               x_cond: Optional[torch.Tensor] = None, cond_mask: Optional[torch.Tensor] = None,
               height=None, width=None, num_frames: int = 1, progress: bool = True,
               guidance_scale: Optional[float] = None,
               on_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
        """Denoise ``z`` [B, C, T, H, W] from noise; ``y``/``y_null`` [B, 1, L, Cy].

        ``x_cond`` [B, C, T, H, W] with ``cond_mask`` [B, T] in [0, 1] holds frame ``j`` at its
        reference latent while t > cond_mask[:, j] * 1000 (image-to-video / extension), and
        passes the matching ``x_mask`` to the model.
        """
        cfg = self.cfg_scale if guidance_scale is None else guidance_scale
        additional_args = dict(additional_args or {})
        ts = self.timesteps(height, width, num_frames, device=z.device)
        y_in = torch.cat([y, y_null], 0)
        m_in = None if mask is None else torch.cat([mask, mask], 0) if mask.shape[0] == y.shape[0] \
            else mask
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
                additional_args["x_mask"] = torch.cat([follow, follow], 0)
            z_in = torch.cat([z, z], 0)
            t_in = t.expand(z_in.shape[0]).to(z.dtype)
            out = model(z_in, t_in, y_in, mask=m_in, **additional_args)
            v = out[:, : z.shape[1]] if out.shape[1] != z.shape[1] else out
            v_c, v_u = v.chunk(2, dim=0)
            g = oscillation_scale(cfg, i, self.force_num) if self.use_oscillation_guidance \
                else cfg
            v = v_u + g * (v_c - v_u)
            if self.use_flaw_fix:
                v = fix_guidance_flaw(v, v_c)
            t_next = ts[i + 1] if i + 1 < len(ts) else torch.zeros_like(t)
            z_new = z + v.to(z.dtype) * ((t - t_next) / self.num_timesteps)
            if cond_mask is not None:
                z_new = torch.where(noise_added[:, None, :, None, None], z_new, z)
            z = z_new
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
