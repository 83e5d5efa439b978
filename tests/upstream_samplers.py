"""Upstream Open-Sora's sampling loops (RFLOW.sample of v1.2.0 and v1.3), written from their
formulas as test doubles: they call the model without any session, exactly as upstream's
scripts do, so the cache must recognise each loop as one run by itself. Imports nothing from
``opensora_duca``.

- v1.2: the classifier-free-guidance batch [z, z] with captions [y, y_null]; with a per-frame
  ``frame_mask`` (1: generate, 0: keep the reference frame, in between: a reference frame that
  starts following the timestep once t <= mask * 1000) each step first re-noises the frames that
  start following, passes ``x_mask`` and holds the others at their reference afterwards.
- v1.3: the same plus oscillation guidance and the flaw fix; with ``mask_index`` (i2v / v2v) the
  batch [z, z, z] with captions [y, y_null, y_null], ``cond=[z_cond, z_cond, 0]``, ``cond_mask``
  and ``y_null``, guided as u_all + g_img (u_text - u_all) + g_txt (c - u_text); with
  ``use_sdedit`` the conditioned frames of z are replaced every step by the condition noised
  to the current timestep with fresh noise.
"""
from __future__ import annotations

import torch


def _timesteps(steps, batch, dtype):
    return [torch.full((batch,), (1.0 - i / steps) * 1000.0, dtype=dtype) for i in range(steps)]


def _add_noise(x0, noise, t):
    tau = (t / 1000.0).view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - tau) * x0 + tau * noise


def _dt(ts, i):
    d = ts[i] - ts[i + 1] if i < len(ts) - 1 else ts[i]
    return (d / 1000.0)[:, None, None, None, None]


def _oscillation(gs, i, force_num=10):
    return gs if i < force_num or i % 2 == 0 else 1.0


@torch.no_grad()
def rflow_v12(model, z, y, y_null, mask, steps=30, cfg_scale=7.0, frame_mask=None, seed=0,
              first=0, last=None, **model_kw):
    """Steps ``first`` .. ``last - 1`` of the ``steps`` schedule (default all; a later
    ``first`` is an SDEdit-style start)."""
    g = torch.Generator().manual_seed(seed)
    args = dict(y=torch.cat([y, y_null], 0), mask=mask, **model_kw)
    ts = _timesteps(steps, z.shape[0], z.dtype)
    if frame_mask is not None:
        noise_added = frame_mask == 1
    for i, t in enumerate(ts):
        if i < first or (last is not None and i >= last):
            continue
        if frame_mask is not None:
            x0 = z.clone()
            x_noise = _add_noise(x0, torch.randn(x0.shape, generator=g, dtype=x0.dtype), t)
            upper = frame_mask * 1000.0 >= t[:, None]
            args["x_mask"] = upper.repeat(2, 1)
            z = torch.where((upper & ~noise_added)[:, None, :, None, None], x_noise, x0)
            noise_added = upper
        pred = model(torch.cat([z, z], 0), torch.cat([t, t], 0), **args).chunk(2, dim=1)[0]
        cond, uncond = pred.chunk(2, dim=0)
        z = z + (uncond + cfg_scale * (cond - uncond)) * _dt(ts, i)
        if frame_mask is not None:
            z = torch.where(upper[:, None, :, None, None], z, x0)
    return z


@torch.no_grad()
def rflow_v13(model, z, y, y_null, mask, steps=30, cfg_scale=7.5, image_cfg_scale=7.5,
              z_cond=None, z_cond_mask=None, mask_index=None, use_sdedit=False,
              oscillation=True, flaw_fix=True, seed=0, **model_kw):
    g = torch.Generator().manual_seed(seed)
    i2v = mask_index is not None and len(mask_index) > 0
    if z_cond is not None:
        z_cond = z_cond * z_cond_mask
    args = dict(y=torch.cat([y, y_null, y_null] if i2v else [y, y_null], 0), mask=mask,
                **model_kw)
    ts = _timesteps(steps, z.shape[0], z.dtype)
    for i, t in enumerate(ts):
        if use_sdedit and i2v:
            noisy = _add_noise(z_cond, torch.randn(z_cond.shape, generator=g,
                                                   dtype=z_cond.dtype), t)
            z = torch.where(z_cond_mask == 1, noisy, z)
        text_gs = _oscillation(cfg_scale, i) if oscillation else cfg_scale
        if i2v:
            image_gs = _oscillation(image_cfg_scale, i) if oscillation else image_cfg_scale
            z_in = torch.cat([z, z, z], 0)
            pred = model(z_in, torch.cat([t, t, t], 0),
                         cond=torch.cat([z_cond, z_cond, torch.zeros_like(z_cond)], 0),
                         cond_mask=torch.cat([z_cond_mask] * 3, 0), mask_index=mask_index,
                         y_null=y_null.repeat(z_in.shape[0], 1, 1, 1), **args).chunk(2, dim=1)[0]
            cond, u_text, u_all = pred.chunk(3, dim=0)
            v = u_all + image_gs * (u_text - u_all) + text_gs * (cond - u_text)
        else:
            pred = model(torch.cat([z, z], 0), torch.cat([t, t], 0), **args).chunk(2, dim=1)[0]
            cond, uncond = pred.chunk(2, dim=0)
            v = uncond + text_gs * (cond - uncond)
            if flaw_fix:
                dims = list(range(1, v.dim()))
                factor = cond.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True)
                v = v * (0.7 * factor + 0.3)
        z = z + v * _dt(ts, i)
    return z
