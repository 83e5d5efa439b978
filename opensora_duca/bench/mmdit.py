"""Open-Sora 2.0 (MMDiT) benchmark presets of ``tools/benchmark.py``.

* ``mmdit-cpu``: the CPU-sized MMDiT (``MMDiT-cpu``, random weights) on a 4 x 16 x 16 token grid,
  30 steps, the three-branch guidance batch of one clip — runs on a CPU in seconds;
* ``opensora2-256px`` / ``opensora2-768px``: the published Open-Sora 2.0 MMDiT (11B: 19 double,
  38 single blocks, hidden 3072) on upstream's default video (129 frames, 16:9; 33 latent
  frames of 12 x 21 / 36 x 64 tokens), 50 steps, 512 text tokens, the three-branch batch.
  They need a GPU (``--allow-cpu`` to force one) and print the uncached step's TFLOP.

Each policy samples the same noise with an upstream-shaped loop (upstream's schedule with its
resolution shift, text and image guidance with oscillation); the report gives wall time per
run, the speedup over uncached, the analytic FLOPs ratio, and the PSNR of the final latents
against the uncached run.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List

import torch

from ..cache import apply_cache, remove_cache
from ..cache.flops import TrunkShape
from ..cache.layouts.mmdit import full_step_flops
from ..pipeline import _sync
from ..pipeline_v2 import image_size_v2
from ..registry import MODELS, build_module
from ..schedulers.opensora2 import get_schedule, latent_frames, oscillation_scale, prepare_ids

V2_PRESETS: Dict[str, dict] = {
    "mmdit-cpu": dict(model="MMDiT-cpu", grid=(4, 16, 16), txt_len=32, steps=30, large=False),
    "opensora2-256px": dict(model="OpenSora-v2-MMDiT", resolution="256px", txt_len=512,
                            steps=50, large=True),
    "opensora2-768px": dict(model="OpenSora-v2-MMDiT", resolution="768px", txt_len=512,
                            steps=50, large=True),
}


def preset_grid(preset: dict) -> tuple:
    """(T, H, W) tokens of a preset (upstream's 129-frame 16:9 video for the published ones)."""
    if "grid" in preset:
        return tuple(preset["grid"])
    h, w = image_size_v2(preset["resolution"], "16:9")
    return (latent_frames(129, 4, causal=True), math.ceil(h / 16), math.ceil(w / 16))


def step_tflops(preset: dict, hidden=3072, depth=19, single=38, mlp_ratio=4.0) -> float:
    """The uncached step's TFLOP of the published model at a preset's size (three branches)."""
    T, H, W = preset_grid(preset)
    shape = TrunkShape(batch=3, frames=T, spatial=H * W, hidden=hidden, depth=depth,
                       caption_len=preset["txt_len"], mlp_hidden=int(hidden * mlp_ratio),
                       temporal=False, rows=H, width=W, single_depth=single)
    return full_step_flops(shape) / 1e12


def _inputs(model, grid, txt_len, device, dtype, seed):
    """One clip's three-branch batch (text, unconditional, image-unconditional) on ``grid``."""
    cfg = model.config
    T, H, W = grid
    g = torch.Generator().manual_seed(seed)
    n = T * H * W
    img_ids, txt_ids = prepare_ids(3, T, H, W, txt_len)
    txt = torch.randn(1, txt_len, cfg.context_in_dim, generator=g)
    vec = torch.randn(1, cfg.vec_in_dim, generator=g)
    out = dict(img=torch.randn(1, n, cfg.in_channels, generator=g).repeat(3, 1, 1),
               img_ids=img_ids, txt=torch.cat([txt, torch.zeros_like(txt).repeat(2, 1, 1)]),
               txt_ids=txt_ids, y_vec=torch.cat([vec, torch.zeros_like(vec).repeat(2, 1)]))
    if cfg.cond_embed:
        cond = torch.randn(1, n, cfg.in_channels + cfg.patch_size ** 2, generator=g) * 0.1
        out["cond"] = torch.cat([cond, cond, torch.zeros_like(cond)])
    return {k: v.to(device=device, dtype=dtype) for k, v in out.items()}


@torch.no_grad()
def _sample(model, inp, timesteps):
    img = inp["img"].clone()
    n = img.shape[0] // 3
    for i, (t, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        img = torch.cat([img[:n]] * 3)
        pred = model(**dict(inp, img=img, timesteps=torch.full((3 * n,), t, dtype=img.dtype,
                                                               device=img.device)))
        c, u, u2 = pred.float().chunk(3)
        text, image = oscillation_scale(7.5, i), oscillation_scale(3.0, i)
        v = u2 + image * (u - u2) + text * (c - u)
        img = (img.float() + (t_next - t) * torch.cat([v, v, v])).to(img.dtype)
    return img[:n].float()


def run_v2_benchmark(name: str, policies: List[dict], device, dtype, repeat: int = 3,
                     steps=None, seed: int = 42, log=print) -> dict:
    """Time each policy (median of ``repeat`` interleaved rounds) against uncached on preset
    ``name``."""
    preset = V2_PRESETS[name]
    grid = preset_grid(preset)
    steps = preset["steps"] if steps is None else steps
    torch.manual_seed(0)
    model = build_module(dict(type=preset["model"], device_map=device, torch_dtype=dtype),
                         MODELS).eval()
    inp = _inputs(model, grid, preset["txt_len"], device, dtype, seed)
    ts = get_schedule(steps, grid[1] * grid[2], grid[0])
    cfgs = [dict(type="none")] + [p for p in policies if p.get("type") != "none"]
    times: List[List[float]] = [[] for _ in cfgs]
    outs, stats = [None] * len(cfgs), [None] * len(cfgs)
    for _ in range(repeat):  # interleaved rounds: a load change hits every policy alike
        for k, cfg in enumerate(cfgs):
            mgr = apply_cache(model, cfg)
            _sync(device)
            t0 = time.perf_counter()
            outs[k] = _sample(model, inp, ts)
            _sync(device)
            times[k].append(time.perf_counter() - t0)
            stats[k] = mgr.stats()
            remove_cache(model)
    rows, ref = [], outs[0]
    for cfg, t, out, st in zip(cfgs, times, outs, stats):
        mse = float((out - ref).pow(2).mean())
        peak = float(ref.abs().max()) ** 2
        rows.append(dict(policy=cfg, seconds=sorted(t)[len(t) // 2], flops_ratio=st["flops_ratio"],
                         steps=st["steps_by_kind"],
                         psnr=float("inf") if mse == 0 else 10 * math.log10(peak / mse)))
        log(f"{cfg}: {rows[-1]['seconds']:.2f} s, FLOPs ratio {st['flops_ratio']:.2f}")
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
    return dict(preset=name, grid=list(grid), steps=steps, tokens=grid[0] * grid[1] * grid[2],
                step_tflops=step_tflops(preset) if preset["large"] else None, rows=rows)


def v2_table(report: dict) -> str:
    lines = ["| policy | s / run | speedup | FLOPs ratio | wall / FLOPs | PSNR vs uncached (dB) |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        name = ", ".join(f"{k}={v}" for k, v in r["policy"].items())
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['flops_ratio']:.2f}x | {100 * r['speedup'] / r['flops_ratio']:.0f}% | "
                     f"{r['psnr']:.1f} |")
    return "\n".join(lines)
