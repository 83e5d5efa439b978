"""Rectified-flow sampler ("rflow"), as Open-Sora 1.2 samples and trains.

Timesteps t_i = (1 - i/n) * 1000, optionally transformed by t' = r t / (1 + (r - 1) t) (on
t/1000) with r = sqrt(H*W / 512^2) * sqrt(latent frames). Each step runs the model once on the
classifier-free-guidance batch [z, z] with captions [y, y_null], combines
v = v_u + cfg (v_c - v_u) and moves z += v * (t_i - t_{i+1}) / 1000 (t_n = 0).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm import tqdm

from ..registry import SCHEDULERS


def timestep_transform(t: torch.Tensor, height: float, width: float, num_frames: int,
                       base_resolution: int = 512 * 512, scale: float = 1.0,
                       num_timesteps: int = 1000) -> torch.Tensor:
    t = t / num_timesteps
    frames = 1 if num_frames == 1 else num_frames // 17 * 5
    ratio_space = (float(height) * float(width) / base_resolution) ** 0.5
    ratio = ratio_space * max(frames, 1) ** 0.5 * scale
    return ratio * t / (1 + (ratio - 1) * t) * num_timesteps


@SCHEDULERS.register_module("rflow")
class RFlow:
    def __init__(self, num_sampling_steps: int = 30, num_timesteps: int = 1000,
                 cfg_scale: float = 4.0, use_timestep_transform: bool = False,
                 transform_scale: float = 1.0, use_discrete_timesteps: bool = False,
                 sample_method: str = "uniform", loc: float = 0.0, scale: float = 1.0):
        if not isinstance(num_sampling_steps, int) or num_sampling_steps < 1:
            raise ValueError(f"scheduler num_sampling_steps={num_sampling_steps!r}: must be an "
                             f"integer >= 1")
        if sample_method not in ("uniform", "logit-normal"):
            raise ValueError(f"scheduler sample_method={sample_method!r}; accepted: "
                             f"['uniform', 'logit-normal']")
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
                                    num_timesteps=self.num_timesteps)
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
            v = v_u + cfg * (v_c - v_u)
            t_next = ts[i + 1] if i + 1 < len(ts) else torch.zeros_like(t)
            z_new = z + v.to(z.dtype) * ((t - t_next) / self.num_timesteps)
            if cond_mask is not None:
                z_new = torch.where(noise_added[:, None, :, None, None], z_new, z)
            z = z_new
            if on_step is not None:
                on_step(i, z)
        return z

    # ------------------------------------------------------------- training
    def sample_t(self, batch: int, device="cpu", generator=None) -> torch.Tensor:
        """Training timesteps in [0, num_timesteps): uniform or logit-normal."""
        if self.sample_method == "logit-normal":
            u = torch.randn(batch, device=device, generator=generator) * self.scale + self.loc
            return torch.sigmoid(u) * self.num_timesteps
        return torch.rand(batch, device=device, generator=generator) * self.num_timesteps

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
