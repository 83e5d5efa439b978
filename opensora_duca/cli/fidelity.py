"""Fidelity of the videos in B_DIR against the references in A_DIR (matched by file name).

    python tools/fidelity.py A_DIR B_DIR [--json OUT] [--lpips] [--device cpu]

Prints a markdown table (per video and aggregate PSNR / SSIM [/ LPIPS]) and lists unmatched,
unreadable and mismatched files. Exit status 2 when a folder does not exist or no video could be
compared.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..eval.fidelity import compare_dirs
from ..utils.atomic import write_json
from ..utils.host_memory import keep_freed_host_memory


def _fmt(x, nd=4):
    return "n/a" if x is None else f"{x:.{nd}f}"


def markdown_report(res: dict) -> str:
    lines = [f"A (reference): `{res['a_dir']}`  ", f"B (compared): `{res['b_dir']}`", ""]
    lines += ["| video | frames | PSNR (dB) | SSIM | LPIPS |", "|---|---:|---:|---:|---:|"]
    for name, v in res["per_video"].items():
        lines.append(
            f"| {name} | {v['num_frames']} | {_fmt(v['psnr'], 2)} | {_fmt(v['ssim'])} "
            f"| {_fmt(v['lpips'])} |"
        )
    agg = res["aggregate"]
    lines.append(
        f"| **aggregate ({res['num_compared']} videos)** | | **{_fmt(agg['psnr'], 2)}** "
        f"| **{_fmt(agg['ssim'])}** | **{_fmt(agg['lpips'])}** |"
    )
    lines.append("")
    if res.get("lpips_message"):
        lines.append(f"LPIPS: {res['lpips_message']}")
    for key, title in (
        ("only_in_a", "only in A"),
        ("only_in_b", "only in B"),
        ("ignored_partial", "ignored temporary .partial files"),
        ("ignored_other", "ignored non-video files"),
    ):
        if res[key]:
            lines.append(f"{title} ({len(res[key])}): " + ", ".join(res[key]))
    for u in res["unreadable"]:
        lines.append(f"UNREADABLE: {u['name']} in {u['dir']}: {u['error']}")
    for m in res["mismatched"]:
        lines.append(
            f"MISMATCHED: {m['name']}: A {m['a_shape']} vs B {m['b_shape']} "
            f"({m.get('note', 'not compared')})"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    keep_freed_host_memory()  # CPU runs: no page faults per step
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("a_dir", help="reference videos (e.g. uncached)")
    ap.add_argument("b_dir", help="videos to compare (e.g. cached)")
    ap.add_argument("--json", dest="json_out", help="write the full result to this JSON file")
    ap.add_argument(
        "--lpips", action="store_true", help="also compute LPIPS (alex) if available offline"
    )
    ap.add_argument(
        "--device", default="cpu", help="device for SSIM and LPIPS arithmetic (cpu, cuda)"
    )
    args = ap.parse_args(argv)

    for d in (args.a_dir, args.b_dir):
        if not os.path.isdir(d):
            print(f"error: directory does not exist: {d}", file=sys.stderr)
            return 2
    res = compare_dirs(args.a_dir, args.b_dir, use_lpips=args.lpips, device=args.device)
    print(markdown_report(res))
    if args.json_out:
        write_json(args.json_out, res)
        print(f"\nwrote {args.json_out}")
    if not res["matched"]:
        print(
            f"error: no video file names match between {args.a_dir} and {args.b_dir}",
            file=sys.stderr,
        )
        return 2
    if res["num_compared"] == 0:
        print(
            "error: matching videos exist but none could be compared (see UNREADABLE / MISMATCHED)",
            file=sys.stderr,
        )
        return 2
    return 0
