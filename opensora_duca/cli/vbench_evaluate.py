"""Score a folder of generated videos with the genuine VBench code (vbench==0.1.5), offline.

    python tools/vbench_evaluate.py VIDEO_DIR --weights-dir D [--dimensions dim ...]
        [--device cpu|cuda] [--output-dir OUT] [--json RESULT.json]
        [--mode vbench_standard|custom_input] [--name NAME]

Weights are read from D (used as VBENCH_CACHE_DIR); dimensions whose weights are missing are skipped
and listed. Prints per-dimension raw and normalised scores and Quality / Semantic / Total over the
scored dimensions (a partial set is flagged as such).
"""

from __future__ import annotations

import argparse
import os
import sys

from ..eval import vbench as vb
from ..utils.atomic import write_json
from ..utils.host_memory import keep_freed_host_memory


def _fmt(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def markdown_report(res: dict) -> str:
    s = res["summary"]
    lines = [
        f"VBench on `{res['videos_dir']}` ({res['num_videos']} videos, mode {res['mode']}, "
        f"device {res['device']})",
        "",
        "| group | dimension | raw | normalised (%) | videos |",
        "|---|---|---:|---:|---:|",
    ]
    for group, dims in (("quality", vb.QUALITY_DIMENSIONS), ("semantic", vb.SEMANTIC_DIMENSIONS)):
        for d in dims:
            if d in res["dimensions"]:
                r = res["dimensions"][d]
                lines.append(
                    f"| {group} | {d} | {r['raw']:.4f} | {r['normalized']:.2f} "
                    f"| {r['num_videos']} |"
                )
            elif d in res["skipped_missing_weights"]:
                lines.append(f"| {group} | {d} | skipped: missing weights | | |")
            elif d in res["failed"]:
                lines.append(f"| {group} | {d} | FAILED | | |")
    lines += [
        "",
        f"Quality: {_fmt(s['quality'])} % over {len(s['quality_dims'])}/7 dims"
        + ("" if s["quality_complete"] else " (partial)"),
        f"Semantic: {_fmt(s['semantic'])} % over {len(s['semantic_dims'])}/9 dims"
        + ("" if s["semantic_complete"] else " (partial)"),
        f"Total: {_fmt(s['total'])} %" + ("" if s["complete"] else " (partial or not available)"),
    ]
    lines += [f"note: {n}" for n in s["notes"]]
    for d, files in res["skipped_missing_weights"].items():
        lines.append(f"skipped {d}: missing {', '.join(files)}")
    for d, err in res["failed"].items():
        lines.append(f"FAILED {d}: {err}")
    for d, m in res.get("missing_videos", {}).items():
        if m["missing"]:
            lines.append(
                f"{d}: {m['missing']} of {m['expected']} expected videos missing "
                f"(e.g. {m['examples'][:2]})"
            )
    if res["not_evaluated_files"]:
        lines.append(
            "files not evaluated (temporary, non-mp4 or undecodable): "
            f"{res['not_evaluated_files'][:10]}"
            + (" ..." if len(res["not_evaluated_files"]) > 10 else "")
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    keep_freed_host_memory()  # CPU runs: no page faults per step
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("video_dir")
    ap.add_argument(
        "--weights-dir", required=True, help="local VBench model folder (VBENCH_CACHE_DIR layout)"
    )
    ap.add_argument(
        "--dimensions", nargs="+", default=None, help=f"subset of: {' '.join(vb.ALL_DIMENSIONS)}"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--output-dir",
        default=None,
        help="VBench output folder (default: VIDEO_DIR/../vbench_results)",
    )
    ap.add_argument(
        "--json",
        dest="json_out",
        default=None,
        help="write the result here (default: OUTPUT_DIR/NAME_summary.json)",
    )
    ap.add_argument(
        "--mode", default="vbench_standard", choices=["vbench_standard", "custom_input"]
    )
    ap.add_argument("--name", default="opensora_duca")
    args = ap.parse_args(argv)

    if not os.path.isdir(args.video_dir):
        print(f"error: video folder does not exist: {args.video_dir}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.weights_dir):
        print(f"error: weights folder does not exist: {args.weights_dir}", file=sys.stderr)
        return 2
    try:
        res = vb.evaluate(
            args.video_dir,
            args.weights_dir,
            dimensions=args.dimensions,
            device=args.device,
            output_dir=args.output_dir,
            mode=args.mode,
            name=args.name,
        )
    except vb.VBenchUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_report(res))
    out = args.json_out or os.path.join(res["output_dir"], f"{args.name}_summary.json")
    write_json(out, res)
    print(f"\nwrote {out}")
    return 0 if res["dimensions"] else 1
