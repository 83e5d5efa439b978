"""Caption-set evaluation of the demo model: generate the fixed caption set
(``synthetic.caption_set``: every colour x shape x direction caption, the captions the demo
model was trained on, so NOT held out) with several cache policies on the same prompts, seeds
and weights, and judge every clip against its caption.

Used by ``tools/judge.py --config ...``. For each policy: the judge's shares (colour, shape,
motion, one object, colour+motion, ``ok``, ``all_ok``), mean flicker, agreement of the ``ok``
verdict with the uncached clip, PSNR/SSIM of the frames against the uncached clip, sampling wall
time and the cache statistics.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from ..cache import apply_cache, remove_cache
from ..utils.video import save_video, to_uint8_frames
from .fidelity import psnr, ssim
from .judge import judge, summarize


def _policy_cfg(policy: Any) -> dict:
    return dict(type=policy) if isinstance(policy, str) else dict(policy)


def evaluate_policies(pipe, policies: Sequence[Any], prompts: Sequence[str],
                      seeds: Sequence[int], batch_size: int = 8, save_dir: Optional[str] = None,
                      progress: bool = True) -> Dict[str, Any]:
    """Judge ``len(prompts) * len(seeds)`` clips per policy. The first policy must be ``none``
    (the reference for agreement and fidelity). Returns ``{"policies": [...], "clips": n}``."""
    cfgs = [_policy_cfg(p) for p in policies]
    if not cfgs or cfgs[0]["type"] != "none":
        raise ValueError(f"policies={list(policies)!r}: the first must be 'none' (the uncached "
                         f"reference)")
    jobs = [(p, s) for s in seeds for p in prompts]
    if pipe.cache_manager is not None:
        remove_cache(pipe.model)
        pipe.cache_manager = None
    ref_frames: List[torch.Tensor] = []
    ref_ok: List[bool] = []
    out = []
    for cfg in cfgs:
        name = cfg["type"]
        if name != "none":
            pipe.cache_manager = apply_cache(pipe.model, cfg)
        verdicts, frames01, sample_s, stats = [], [], 0.0, None
        bar = tqdm(range(0, len(jobs), batch_size), desc=f"judge {name}", disable=not progress)
        for b0 in bar:
            batch = jobs[b0:b0 + batch_size]
            res = pipe.generate([p for p, _ in batch], seeds=[s for _, s in batch],
                                batch_size=len(batch))
            sample_s += res["timings"]["sample_s"]
            for (prompt, seed), video in zip(batch, res["video"]):
                verdicts.append(judge(to_uint8_frames(video), prompt))
                frames01.append((video.transpose(0, 1) + 1) / 2)  # [T, C, H, W] in [0, 1]
                if save_dir is not None:
                    save_video(video, os.path.join(save_dir, name, f"{prompt}-{seed}.mp4"))
            if pipe.cache_manager is not None:
                stats = pipe.cache_manager.stats()
        if name == "none":
            ref_frames, ref_ok = frames01, [v["ok"] for v in verdicts]
        summary = summarize(verdicts)
        a, b = torch.stack(frames01), torch.stack(ref_frames)
        out.append(dict(
            policy=name, config=cfg, **summary,
            agreement=sum(v["ok"] == r for v, r in zip(verdicts, ref_ok)) / len(verdicts),
            psnr=psnr(a, b, layout="BTCHW"), ssim=ssim(a, b, layout="BTCHW"),
            sample_s=sample_s, flops_ratio=stats["flops_ratio"] if stats else 1.0,
            steps_by_kind=stats["steps_by_kind"] if stats else None,
            wrong=[dict(prompt=v["caption"], seed=s, ok=v["ok"], reason=v["reason"])
                   for v, (_, s) in zip(verdicts, jobs) if not v["all_ok"]]))
        if name != "none":
            remove_cache(pipe.model)
            pipe.cache_manager = None
    return dict(policies=out, clips=len(jobs), prompts=list(prompts), seeds=list(seeds))


def format_policy_table(result: Dict[str, Any]) -> str:
    lines = ["| policy | clips | colour | shape | motion | one object | colour+motion | ok "
             "| ok and shape | ok agrees with none | PSNR dB | SSIM | flicker | FLOPs ratio "
             "| sampling s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["policies"]:
        lines.append(f"| {r['policy']} | {r['n']} | {r['color']:.1%} | {r['shape']:.1%} "
                     f"| {r['motion']:.1%} | {r['one_object']:.1%} | {r['color_motion']:.1%} "
                     f"| {r['ok']:.1%} | {r['all_ok']:.1%} | {r['agreement']:.1%} "
                     f"| {r['psnr']:.2f} | {r['ssim']:.4f} | {r['flicker']:.2f} "
                     f"| {r['flops_ratio']:.2f}x | {r['sample_s']:.1f} |")
    return "\n".join(lines)
