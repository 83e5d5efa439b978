"""The quality-speed frontier of the cache policies on one model.

Every point of a sweep (a policy config) generates the same clips as the uncached reference
(same captions, seeds and noise), and is scored against it: PSNR and SSIM of the decoded frames
(in [0, 1]), the caption judge's verdict and its agreement with the uncached clip's verdict, the
analytic FLOPs ratio, and the measured sampling time (wall and process CPU time; the CPU-time
speedup is the steadier one on a shared machine). Results go to one JSON file after every point,
so an interrupted sweep resumes where it stopped (the reference frames are kept beside it).

An existing JSON is only ever extended: one of other settings (another ``meta``: config,
captions, seeds, steps) or one that cannot be read is refused (:func:`load_existing`, a
``ValueError``) and left as it is; a run holds the file's lock
(:func:`opensora_duca.utils.atomic.exclusive_lock`) so a second run on the same file is
refused instead of replacing the first one's points.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from ..cache import apply_cache, build_policy, remove_cache
from ..cache.calibrate import check_calibration_model
from ..utils.atomic import exclusive_lock, save_figure, save_torch, write_json
from ..utils.video import to_uint8_frames
from .fidelity import psnr, ssim
from .judge import judge, summarize

Point = Tuple[str, Dict[str, Any]]  # (family, policy config)


def _tables(table: Sequence[str]) -> dict:
    """Cycle tables from one list of entries for every kind (cross-attention: the list twice,
    a cycle twice as long, as DuCa's released tables)."""
    t, c = list(table), len(table)
    return dict(cycles=dict(spatial_attn=c, temporal_attn=c, mlp=c, cross_attn=2 * c),
                tables=dict(spatial_attn=t, temporal_attn=t, mlp=t, cross_attn=t + t))


def default_sweep(calibration: Optional[str] = None) -> List[Point]:
    """The knob settings of every family (fixed before a run; docs/frontier.md says how they
    were chosen): DuCa, its int8 store and ToCa at the released preset, DuCa and VerifiedDuCa
    with forecasting, FORA / TrunkReuse / TaylorSeer with forecasting (and bdf2), the adaptive
    TeaCache, FirstBlockCache, MagCache, EasyCache and SpeCa."""
    F, C, A = "full", "conservative", "aggressive"
    fc1 = dict(order=1)
    pts: List[Point] = [
        ("DuCa", dict(type="DuCa")),
        ("DuCa (int8 store)", dict(type="DuCa", stored_dtype="int8")),
        ("ToCa", dict(type="ToCa")),
        ("DuCa+forecast", dict(type="DuCa", forecast=fc1)),
        ("VerifiedDuCa", dict(type="VerifiedDuCa")),
        ("VerifiedDuCa", dict(type="VerifiedDuCa", aggressive="modules", warmup_steps=1,
                              **_tables([F, A, C, A, A]))),
        ("VerifiedDuCa", dict(type="VerifiedDuCa", aggressive="modules", warmup_steps=1,
                              verify_threshold=0.05, **_tables([F, A, C, A, A]))),
        # 5.6x (chosen on probe seed 9 with the current checkpoint)
        ("VerifiedDuCa", dict(type="VerifiedDuCa", aggressive="modules", warmup_steps=1,
                              **_tables([F, A, A, C, A, A, A]))),
    ]
    for interval in (4, 5, 6):
        pts.append(("FORA+forecast", dict(type="FORA", interval=interval, forecast=fc1)))
    # 5 computed steps of 30 (6x), placed later than every 6th (chosen on probe seed 9: the
    # first with the previous checkpoint, the second with the current one)
    for sched in ([0, 5, 11, 18, 25], [0, 6, 13, 20, 26]):
        pts.append(("FORA+forecast", dict(type="FORA", schedule=sched, forecast=fc1)))
    pts.append(("FORA+bdf2", dict(type="FORA", interval=5,
                                  forecast=dict(method="bdf2", corrector="heun"))))
    pts.append(("TrunkReuse+forecast", dict(type="TrunkReuse", interval=5, forecast=fc1)))
    pts.append(("TaylorSeer", dict(type="TaylorSeer", interval=4, order=1)))
    tea = dict(type="TeaCache", threshold=0.1)
    if calibration:
        tea["calibration"] = calibration
    pts.append(("TeaCache", tea))
    pts.append(("FirstBlockCache", dict(type="FirstBlockCache", threshold=0.1)))
    pts.append(("MagCache", dict(type="MagCache")))
    pts.append(("MagCache", dict(type="MagCache", threshold=0.2, max_skips=3)))
    pts.append(("EasyCache", dict(type="EasyCache", threshold=0.1)))
    pts.append(("EasyCache", dict(type="EasyCache", threshold=0.2)))
    pts.append(("SpeCa", dict(type="SpeCa")))
    pts.append(("SpeCa", dict(type="SpeCa", threshold=0.2)))
    return pts


def quick_sweep() -> List[Point]:
    """One point per family (for tests and smoke runs)."""
    seen, out = set(), []
    for fam, cfg in default_sweep():
        if fam not in seen:
            seen.add(fam)
            out.append((fam, cfg))
    return out


def point_key(cfg: Dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True)


def frontier_meta(meta: Optional[dict], prompts: Sequence[str], seeds: Sequence[int],
                  steps: int) -> dict:
    """The settings a sweep's points share (a stored sweep resumes only when they match)."""
    return dict(meta or {}, prompts=list(prompts), seeds=list(seeds), steps=int(steps))


def load_existing(out_json: str, meta: dict) -> Optional[dict]:
    """The stored sweep at ``out_json`` when it has the settings ``meta``; None when there is
    no file. A file that cannot be read, is no sweep, or holds other settings raises a
    one-line ``ValueError`` (the file is kept: nothing is discarded without a word)."""
    if not os.path.lexists(out_json):
        return None
    keep = "it is kept as it is: give another --out, or move the file away"
    try:
        with open(out_json, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--out {out_json!r} cannot be read as a frontier sweep "
                         f"({type(err).__name__}: {msg}); {keep}") from None
    if not isinstance(old, dict) or not isinstance(old.get("points"), list) \
            or "reference" not in old or not isinstance(old.get("meta"), dict):
        raise ValueError(f"--out {out_json!r} is not a frontier sweep (expected a JSON object "
                         f"with meta, reference and points); {keep}")
    if old["meta"] != meta:
        diff = sorted(k for k in set(old["meta"]) | set(meta)
                      if old["meta"].get(k) != meta.get(k))
        raise ValueError(f"--out {out_json!r} holds a sweep of other settings (differs in "
                         f"{', '.join(diff)}); {keep}")
    return old


def _generate(pipe, jobs, batch_size: int, progress: bool, desc: str):
    frames, verdicts, wall, cpu, stats = [], [], 0.0, 0.0, None
    for b0 in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not progress,
                   leave=False):
        batch = jobs[b0:b0 + batch_size]
        c0 = time.process_time()
        res = pipe.generate([p for p, _ in batch], seeds=[s for _, s in batch],
                            batch_size=len(batch))
        cpu += time.process_time() - c0
        wall += res["timings"]["sample_s"]
        for (prompt, _), video in zip(batch, res["video"]):
            verdicts.append(judge(to_uint8_frames(video), prompt))
            frames.append(((video.transpose(0, 1) + 1) / 2).float())  # [T, C, H, W] in [0, 1]
        if pipe.cache_manager is not None:
            stats = pipe.cache_manager.stats()
    return torch.stack(frames), verdicts, wall, cpu, stats


def run_frontier(pipe, points: Sequence[Point], prompts: Sequence[str], seeds: Sequence[int],
                 out_json: str, batch_size: int = 16, progress: bool = True,
                 meta: Optional[dict] = None, lock: bool = True) -> dict:
    """Evaluate the uncached reference and every point, resuming from ``out_json`` (the file
    is locked for the run; one of other settings or an unreadable one is refused, see
    :func:`load_existing`); ``lock=False``: the caller holds the lock already."""
    if not lock:
        return _run_locked(pipe, points, prompts, seeds, out_json, batch_size, progress, meta)
    with exclusive_lock(out_json):
        return _run_locked(pipe, points, prompts, seeds, out_json, batch_size, progress, meta)


def _reference(ref_path: str, n: int):
    """The stored reference frames and verdicts, or None when missing or unusable."""
    try:
        ref = torch.load(ref_path, weights_only=True)
        if len(ref["ok"]) == n and ref["frames"].shape[0] == n:
            return ref["frames"], ref["ok"]
    except Exception:  # missing, truncated or foreign: the frames are recomputed
        pass
    return None


def _run_locked(pipe, points, prompts, seeds, out_json, batch_size, progress, meta) -> dict:
    jobs = [(p, s) for s in seeds for p in prompts]
    meta = frontier_meta(meta, prompts, seeds, pipe.scheduler.num_sampling_steps)
    ref_path = out_json + ".reference.pt"
    result = load_existing(out_json, meta) or {"meta": meta, "reference": None, "points": []}
    for _, cfg in points:  # before any clip: a calibration fitted on another model
        if cfg.get("calibration") is not None:
            check_calibration_model(build_policy(cfg), pipe.model)
    if pipe.cache_manager is not None:
        remove_cache(pipe.model)
        pipe.cache_manager = None
    ref = _reference(ref_path, len(jobs)) if result["reference"] is not None else None
    if ref is None:
        # the uncached clips (deterministic: a lost frames file gives the same frames again;
        # a stored reference keeps its timings so the stored speedups stay consistent)
        frames, verdicts, wall, cpu, _ = _generate(pipe, jobs, batch_size, progress, "none")
        save_torch(ref_path, {"frames": frames, "ok": [v["ok"] for v in verdicts]})
        if result["reference"] is None:
            result["reference"] = dict(policy="none", wall_s=wall, cpu_s=cpu,
                                       **summarize(verdicts))
            write_json(out_json, result)
        ref = frames, [v["ok"] for v in verdicts]
    ref_frames, ref_ok = ref
    done = {point_key(p["config"]) for p in result["points"]}
    for family, cfg in points:
        if point_key(cfg) in done:
            continue
        pipe.cache_manager = apply_cache(pipe.model, cfg)
        try:
            frames, verdicts, wall, cpu, stats = _generate(pipe, jobs, batch_size, progress,
                                                           family)
        finally:
            remove_cache(pipe.model)
            pipe.cache_manager = None
        summary = summarize(verdicts)
        result["points"].append(dict(
            family=family, config=cfg, **summary, ok_clips=[v["ok"] for v in verdicts],
            agreement=sum(v["ok"] == r for v, r in zip(verdicts, ref_ok)) / len(verdicts),
            psnr=psnr(frames, ref_frames, layout="BTCHW"),
            ssim=ssim(frames, ref_frames, layout="BTCHW"),
            flops_ratio=stats["flops_ratio"], steps_by_kind=stats["steps_by_kind"],
            peak_stored_bytes=stats["peak_stored_bytes"], wall_s=wall, cpu_s=cpu,
            **({"verify": stats["verify"]} if stats.get("verify") else {}),
            speedup_wall=result["reference"]["wall_s"] / wall,
            speedup_cpu=result["reference"]["cpu_s"] / cpu))
        write_json(out_json, result)
    return result


def _label(cfg: dict) -> str:
    """Short settings: cycle tables as their MLP table's initials (``table=FCA``: full,
    conservative, aggressive), a calibration file as ``calibrated``."""
    parts = []
    for k, v in cfg.items():
        if k in ("type", "cycles"):
            continue
        if k == "tables":
            parts.append("table=" + "".join(str(e)[0].upper() for e in v["mlp"]))
        elif k == "calibration":
            parts.append("calibrated")
        else:
            parts.append(f"{k}={json.dumps(v, separators=(',', ':'))}")
    return ", ".join(parts) or "default"


def format_table(result: dict) -> str:
    lines = ["| family | settings | FLOPs ratio | CPU speedup | PSNR dB | SSIM | judge ok "
             "| agrees with uncached | stored MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    ref = result["reference"]
    lines.append(f"| none | - | 1.00x | 1.00x | inf | 1.0000 | {ref['ok']:.1%} | 100.0% | 0 |")
    for p in sorted(result["points"], key=lambda p: (p["family"], p["flops_ratio"])):
        lines.append(f"| {p['family']} | {_label(p['config'])} | {p['flops_ratio']:.2f}x "
                     f"| {p['speedup_cpu']:.2f}x | {p['psnr']:.2f} | {p['ssim']:.4f} "
                     f"| {p['ok']:.1%} | {p['agreement']:.1%} "
                     f"| {p['peak_stored_bytes'] / 2 ** 20:.1f} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    families: Dict[str, List[dict]] = {}
    for p in result["points"]:
        families.setdefault(p["family"], []).append(p)
    for ax, xkey, xlabel in ((axes[0], "flops_ratio", "FLOPs ratio (uncached / cached)"),
                             (axes[1], "speedup_cpu", "measured CPU speedup")):
        for j, (fam, pts) in enumerate(sorted(families.items())):
            pts = sorted(pts, key=lambda p: p[xkey])
            ax.plot([p[xkey] for p in pts], [p["psnr"] for p in pts], "-",
                    marker="osD^v<>ph*"[j % 10], color=plt.cm.tab20(j % 20), label=fam, ms=5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("PSNR vs uncached (dB)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"{len(meta['prompts'])} captions x {len(meta['seeds'])} seeds, "
                 f"{meta['steps']} steps")
    fig.tight_layout()
    save_figure(path, fig, dpi=110)
    plt.close(fig)
