"""The table caching papers publish for Open-Sora 1.2, one row per cache policy.

Columns: VBench Total / Quality / Semantic (%, from :func:`opensora_duca.eval.vbench.final_scores`),
PSNR / SSIM / LPIPS of each run against the uncached run's videos of the same prompts and seeds
(:func:`opensora_duca.eval.fidelity.compare_dirs`), the speedup (the uncached run's generation
seconds over this run's, summed over the videos both runs made) and the FLOPs ratio (analytic trunk
FLOPs of an uncached run over the actual ones; 1 for the uncached run).

Generation costs come from the ``_meta/{video}.json`` records ``tools/vbench_generate.py`` writes
next to each video (``seconds``: the batch's wall time divided by its videos; ``flops_uncached`` /
``flops_actual``: the cache's analytic counts, None without a cache). Both runs must have been
generated on the same machine with the same batch size for the speedup to mean anything; the
table states the devices and batch sizes it read.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

META_DIR = "_meta"


def read_costs(videos_dir: str) -> Dict[str, dict]:
    """``{video name: record}`` from ``videos_dir/_meta/*.json`` (unreadable records skipped)."""
    folder = os.path.join(videos_dir, META_DIR)
    out: Dict[str, dict] = {}
    if not os.path.isdir(folder):
        return out
    for fn in sorted(os.listdir(folder)):
        if not fn.endswith(".mp4.json"):
            continue
        try:
            with open(os.path.join(folder, fn), "r", encoding="utf-8") as f:
                out[fn[: -len(".json")]] = json.load(f)
        except (OSError, ValueError):
            continue
    return out


def _sum(records: Sequence[dict], key: str) -> Optional[float]:
    vals = [r.get(key) for r in records]
    if not vals or any(v is None for v in vals):
        return None
    return float(sum(vals))


def cost_summary(costs: Dict[str, dict], names: Sequence[str]) -> dict:
    """Summed seconds and FLOPs over ``names`` (the videos present in both runs)."""
    recs = [costs[n] for n in names if n in costs]
    return {
        "videos": len(recs),
        "seconds": _sum(recs, "seconds"),
        "flops_uncached": _sum(recs, "flops_uncached"),
        "flops_actual": _sum(recs, "flops_actual"),
        "labels": sorted({str(r.get("label")) for r in recs}),
        "devices": sorted({str(r.get("device")) for r in recs}),
        "batch_sizes": sorted({int(r.get("batch_size") or 0) for r in recs}),
    }


def table_row(label: str, summary: dict, fidelity: Optional[dict], costs: dict,
              ref_costs: dict, is_reference: bool) -> dict:
    """One row: VBench scores (percent), fidelity against the reference, speedup, FLOPs ratio."""
    agg = (fidelity or {}).get("aggregate") or {}
    speedup = None
    if is_reference:
        speedup = 1.0
    elif costs.get("seconds") and ref_costs.get("seconds"):
        speedup = ref_costs["seconds"] / costs["seconds"]
    if costs.get("flops_actual"):
        flops_ratio = costs["flops_uncached"] / costs["flops_actual"]
    elif is_reference or (costs.get("videos") and costs.get("flops_uncached") is None
                          and "uncached" in costs.get("labels", [])):
        flops_ratio = 1.0
    else:
        flops_ratio = None
    return {
        "label": label,
        "reference": is_reference,
        "vbench_total": summary.get("total"),
        "vbench_quality": summary.get("quality"),
        "vbench_semantic": summary.get("semantic"),
        "vbench_complete": bool(summary.get("complete")),
        "vbench_dims": len(summary.get("quality_dims", [])) + len(summary.get("semantic_dims", [])),
        "psnr": None if is_reference else agg.get("psnr"),
        "ssim": None if is_reference else agg.get("ssim"),
        "lpips": None if is_reference else agg.get("lpips"),
        "compared_videos": None if is_reference else (fidelity or {}).get("num_compared"),
        "speedup": speedup,
        "flops_ratio": flops_ratio,
        "cost_videos": costs.get("videos"),
    }


def _f(x, nd=2, suffix=""):
    return "n/a" if x is None else f"{x:.{nd}f}{suffix}"


def markdown_table(rows: List[dict]) -> str:
    """The rows as the papers print them; partial VBench sets are marked."""
    out = [
        "| policy | VBench Total (%) | Quality (%) | Semantic (%) | PSNR (dB) | SSIM | LPIPS "
        "| speedup | FLOPs ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = "" if r["vbench_complete"] else "*"
        ref = " (reference)" if r["reference"] else ""
        out.append(
            f"| {r['label']}{ref} | {_f(r['vbench_total'])}{mark} | {_f(r['vbench_quality'])}"
            f"{mark} | {_f(r['vbench_semantic'])}{mark} | "
            + ("- | - | - | " if r["reference"] else
               f"{_f(r['psnr'])} | {_f(r['ssim'], 4)} | {_f(r['lpips'], 4)} | ")
            + f"{_f(r['speedup'], 2, 'x')} | {_f(r['flops_ratio'], 2, 'x')} |"
        )
    if any(not r["vbench_complete"] for r in rows):
        dims = sorted({r["vbench_dims"] for r in rows})
        out.append("")
        out.append(f"\\* over {'/'.join(map(str, dims))} of the 16 VBench dimensions (the others "
                   "could not be scored): not comparable to published 16-dimension numbers.")
    return "\n".join(out)


__all__ = ["META_DIR", "read_costs", "cost_summary", "table_row", "markdown_table"]
