"""Score folders of generated videos with the genuine VBench code (vbench==0.1.5), offline, and
assemble the table caching papers publish (VBench, PSNR / SSIM / LPIPS against the uncached
videos, speedup, FLOPs ratio).

    python tools/vbench_evaluate.py VIDEO_DIR [VIDEO_DIR ...] --weights-dir D
        [--dimensions all | dim ...] [--reference UNCACHED_DIR] [--lpips]
        [--device cpu|cuda] [--output-dir OUT] [--json RESULT.json] [--table TABLE.md]
        [--mode vbench_standard|custom_input] [--name NAME] [--upscale-to PIXELS]
        [--skip-missing-weights] [--rank R --world-size N] [--wait-s S]
    python tools/vbench_evaluate.py --weights-dir D --list-weights [--dimensions ...]

Before any work: the dimension names, the folders, whether VBench's module for each dimension
imports here (a dimension named explicitly that cannot run is an error; with ``all`` it is
skipped with one line saying why), that every weight file of the remaining dimensions exists
(``--list-weights`` prints them all with their expected paths; D is VBENCH_CACHE_DIR and the DINO
weights are read from torch.hub's folder, ``$TORCH_HOME/hub``), and that the videos are large
enough for RAFT / AMT (64 pixels; ``--upscale-to 64`` scores nearest-neighbour upscaled copies of
smaller videos). Any of these failing: one line on stderr, exit 2.

With ``--reference UNCACHED_DIR`` every VIDEO_DIR is compared with the uncached run's videos of the
same names (same prompts and seeds) and one row per folder is printed: VBench Total / Quality /
Semantic, PSNR / SSIM / LPIPS, speedup and FLOPs ratio (from the ``_meta`` records
``tools/vbench_generate.py`` writes).

Resuming and ranks: each dimension's score is stored with the list of videos it was computed from
and reused while those are unchanged, so rerunning the same command continues an interrupted run.
``--rank R --world-size N`` (or torchrun's RANK / WORLD_SIZE) scores only the R-th share of the
(folder, dimension) pairs; rank 0 then waits up to ``--wait-s`` seconds for the other shares
(default: 0 under a plain command, 24 h under torchrun) and assembles the report, or says what is
pending (rerun without ranks to assemble).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..eval import vbench as vb
from ..eval import vbench_table as vt
from ..utils.atomic import write_json, write_text
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
    skipped = res.get("skipped_unavailable", {})
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
            elif d in skipped:
                lines.append(f"| {group} | {d} | skipped: cannot run here | | |")
            elif d in res["failed"]:
                lines.append(f"| {group} | {d} | FAILED | | |")
            elif d in res.get("pending", []):
                lines.append(f"| {group} | {d} | pending (another rank) | | |")
    lines += [
        "",
        f"Quality: {_fmt(s['quality'])} % over {len(s['quality_dims'])}/7 dims"
        + ("" if s["quality_complete"] else " (partial)"),
        f"Semantic: {_fmt(s['semantic'])} % over {len(s['semantic_dims'])}/9 dims"
        + ("" if s["semantic_complete"] else " (partial)"),
        f"Total: {_fmt(s['total'])} %" + ("" if s["complete"] else " (partial or not available)"),
    ]
    lines += [f"note: {n}" for n in s["notes"]]
    for d, why in skipped.items():
        lines.append(f"skipped {d}: cannot run here: {why}")
    for d, files in res["skipped_missing_weights"].items():
        lines.append(f"skipped {d}: missing {', '.join(files)}")
    for d, err in res["failed"].items():
        lines.append(f"FAILED {d}: {err}")
    if res.get("resumed"):
        lines.append(f"reused scores stored by an earlier run: {', '.join(res['resumed'])}")
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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("video_dirs", nargs="*", metavar="VIDEO_DIR")
    ap.add_argument(
        "--weights-dir", required=True, help="local VBench model folder (VBENCH_CACHE_DIR layout)"
    )
    ap.add_argument(
        "--dimensions", nargs="+", default=None,
        help=f"all (default) or any of: {' '.join(vb.ALL_DIMENSIONS)}",
    )
    ap.add_argument("--list-weights", action="store_true",
                    help="print every weight file the dimensions need, with its expected path "
                         "and whether it is there, and exit")
    ap.add_argument("--skip-missing-weights", action="store_true",
                    help="score the dimensions whose weights are there and list the others "
                         "(default: missing weights are an error)")
    ap.add_argument("--reference", default=None,
                    help="the uncached run's folder: adds PSNR / SSIM / LPIPS, speedup and FLOPs "
                         "ratio per folder (the paper table)")
    ap.add_argument("--lpips", action="store_true", help="also LPIPS in the paper table")
    ap.add_argument("--upscale-to", type=int, default=None, metavar="PIXELS",
                    help="score nearest-neighbour upscaled copies of videos whose short side is "
                         "smaller (RAFT / AMT need 64)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--output-dir",
        default=None,
        help="VBench output folder (default: VIDEO_DIR/../vbench_results; with several folders "
             "or --reference, one sub-folder per video folder)",
    )
    ap.add_argument(
        "--json",
        dest="json_out",
        default=None,
        help="write the result here (default: OUTPUT_DIR/NAME_summary.json)",
    )
    ap.add_argument("--table", default=None,
                    help="write the paper table (markdown) here (default: OUTPUT_DIR/"
                         "paper_table.md, with --reference)")
    ap.add_argument(
        "--mode", default="vbench_standard", choices=["vbench_standard", "custom_input"]
    )
    ap.add_argument("--name", default=None,
                    help="prefix of VBench's files (default: opensora_duca for one folder, else "
                         "each folder's name)")
    ap.add_argument("--rank", type=int, default=None, help="this process's share (default: "
                    "$RANK or 0)")
    ap.add_argument("--world-size", type=int, default=None, help="number of shares (default: "
                    "$WORLD_SIZE or 1)")
    ap.add_argument("--wait-s", type=float, default=None,
                    help="rank 0: seconds to wait for the other ranks' shares")
    return ap.parse_args(argv)


class UsageError(ValueError):
    """Bad input found before any work: one line, exit 2."""


def _runs(args):
    """[(video_dir, output_dir, name)] and the output root."""
    dirs = list(args.video_dirs)
    if args.reference is not None:
        dirs = [args.reference] + [d for d in dirs if os.path.abspath(d) !=
                                   os.path.abspath(args.reference)]
    single = len(dirs) == 1 and args.reference is None
    if single:
        root = os.path.abspath(args.output_dir or os.path.join(dirs[0], "..", "vbench_results"))
        return [(dirs[0], root, args.name or "opensora_duca")], root
    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"video folders must have distinct names (they label the table rows); "
                         f"repeated: {dup}")
    root = os.path.abspath(args.output_dir or os.path.join(
        os.path.dirname(os.path.abspath(dirs[0])), "vbench_results"))
    return [(d, os.path.join(root, n), args.name or n) for d, n in zip(dirs, names)], root


def _shard(args):
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "0"))
    world = args.world_size if args.world_size is not None else int(
        os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"--rank={rank} --world-size={world} is not accepted; accepted: "
                         f"0 <= rank < world-size")
    return rank, world


def preflight(args):
    """Everything that can be checked before work; raises UsageError (one line)."""
    try:
        dims, explicit = vb.parse_dimensions(args.dimensions)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not os.path.isdir(args.weights_dir):
        raise UsageError(f"--weights-dir {args.weights_dir!r} is not a folder")
    if args.upscale_to is not None and args.upscale_to < 1:
        raise UsageError(f"--upscale-to={args.upscale_to} is not accepted; accepted: pixels >= 1")
    if args.list_weights:
        return dims, explicit, {}
    if not args.video_dirs and args.reference is None:
        raise UsageError("no VIDEO_DIR given (or --list-weights)")
    for d in list(args.video_dirs) + ([args.reference] if args.reference else []):
        if not os.path.isdir(d):
            raise UsageError(f"video folder does not exist: {d}")
    if args.lpips and args.reference is None:
        raise UsageError("--lpips needs --reference (LPIPS is measured against the uncached run)")
    if args.table and args.reference is None:
        raise UsageError("--table needs --reference")
    return dims, explicit, None


def _runnable(args, dims, explicit):
    """Drop the dimensions whose VBench module cannot be imported here; check weights and video
    sizes of the rest. Returns (dims, {dim: why not runnable})."""
    vb.import_vbench(cache_dir=args.weights_dir)
    unavailable = {}
    for d in dims:
        if args.mode == "custom_input" and d in vb.CUSTOM_UNSUPPORTED:
            unavailable[d] = ("not in custom_input mode (it needs the suite's auxiliary "
                              "information of each prompt: use vbench_standard)")
            continue
        err = vb.dimension_import_error(d, args.weights_dir)
        if err is not None:
            unavailable[d] = err
    if unavailable and explicit:
        d, why = next(iter(unavailable.items()))
        more = f" (and {len(unavailable) - 1} more: {sorted(unavailable)[1:]})" \
            if len(unavailable) > 1 else ""
        raise UsageError(f"dimension {d} cannot run here: {why}{more}")
    dims = [d for d in dims if d not in unavailable]
    if not dims:
        raise UsageError("none of the requested dimensions can run here")
    missing = {d: vb.missing_files(d, args.weights_dir) for d in dims}
    missing = {d: m for d, m in missing.items() if m}
    if missing and not args.skip_missing_weights:
        files = sorted({p for m in missing.values() for p in m})
        raise UsageError(f"missing VBench weights for {', '.join(missing)}: {', '.join(files)} "
                         f"(--list-weights lists every file; --skip-missing-weights scores the "
                         f"others)")
    small = [d for d in dims if d in vb.MIN_SIDE and d not in missing]
    if small and not args.upscale_to:
        need = max(vb.MIN_SIDE[d] for d in small)
        for folder in list(args.video_dirs) + ([args.reference] if args.reference else []):
            sizes = vb.video_sizes(folder)
            tiny = {n: hw for n, hw in sizes.items() if min(hw) < need}
            if tiny:
                n, hw = next(iter(tiny.items()))
                raise UsageError(f"{', '.join(small)} need videos of at least {need} pixels; "
                                 f"{len(tiny)} in {folder} are smaller (e.g. {n!r}: {hw[0]}x"
                                 f"{hw[1]}); pass --upscale-to {need} to score upscaled copies")
    return dims, unavailable


def _wait_for(markers, timeout_s):
    t_end = time.monotonic() + max(0.0, timeout_s)
    while True:
        pending = [m for m in markers if not os.path.isfile(m)]
        if not pending or time.monotonic() >= t_end:
            return pending
        time.sleep(2.0)


def main(argv=None) -> int:
    keep_freed_host_memory()  # CPU runs: no page faults per step
    # offline: Tag2Text's tokenizer and BERT weights come from the Hugging Face cache as they are
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(argv)
    try:
        dims, explicit, _ = preflight(args)
        if args.list_weights:
            print("\n".join(vb.weights_listing(dims, args.weights_dir)))
            print(f"(VBENCH_CACHE_DIR = {os.path.abspath(args.weights_dir)}, torch hub folder = "
                  f"{vb.torch_hub_dir()}, Hugging Face cache = {vb.hf_hub_cache()})")
            return 0
        runs, root = _runs(args)
        rank, world = _shard(args)
        dims, unavailable = _runnable(args, dims, explicit)
    except UsageError as e:
        print(f"vbench_evaluate: error: {e}", file=sys.stderr, flush=True)
        return 2
    except vb.VBenchUnavailable as e:
        print(f"vbench_evaluate: error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
        return 3
    for d, why in unavailable.items():
        print(f"skipped {d}: cannot run here: {why}", flush=True)
    if args.device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"

    # ---- this rank's share of the (folder, dimension) pairs
    items = [(i, d) for i in range(len(runs)) for d in dims]
    mine = items[rank::world]
    reused = {i: [] for i in range(len(runs))}
    try:
        for i, (video_dir, out_dir, name) in enumerate(runs):
            my_dims = [d for j, d in mine if j == i]
            if my_dims:
                r = vb.evaluate(video_dir, args.weights_dir, dimensions=my_dims,
                                device=args.device, output_dir=out_dir, mode=args.mode, name=name,
                                min_size=args.upscale_to)
                reused[i] = r["resumed"]
                for d in r["dimensions"]:
                    if d not in r["resumed"]:
                        print(f"scored {d} of {video_dir}", flush=True)
    except FileNotFoundError as e:
        print(f"vbench_evaluate: error: {e}", file=sys.stderr, flush=True)
        return 2
    if world > 1:
        os.makedirs(root, exist_ok=True)
        write_text(os.path.join(root, f".shard-{rank}-of-{world}.done"), "done\n")
        if rank != 0:
            print(f"rank {rank}/{world}: share done ({len(mine)} pair(s)); rank 0 assembles")
            return 0
        wait_s = args.wait_s if args.wait_s is not None else (
            86400.0 if "TORCHELASTIC_RUN_ID" in os.environ else 0.0)
        pending = _wait_for([os.path.join(root, f".shard-{r}-of-{world}.done")
                             for r in range(world)], wait_s)
        if pending:
            print(f"rank 0: {len(pending)} share(s) not finished; rerun the same command "
                  f"without ranks once they are to assemble the report")
            return 0

    # ---- assemble (nothing is scored again: the stored results are read)
    results = []
    for i, (video_dir, out_dir, name) in enumerate(runs):
        res = vb.evaluate(video_dir, args.weights_dir, dimensions=dims, device=args.device,
                          output_dir=out_dir, mode=args.mode, name=name,
                          min_size=args.upscale_to, compute=False)
        res["resumed"] = reused[i]  # stored before this command (by this process: 'scored')
        res["skipped_unavailable"] = unavailable
        res["name"] = name
        results.append(res)
        print(markdown_report(res) + "\n", flush=True)
    out = {"dimensions": dims, "skipped_unavailable": unavailable, "runs": results}
    # 1: some dimension failed or is still pending
    rc = 0 if all(r["dimensions"] and not r["failed"] and not r["pending"] for r in results) else 1
    if args.reference is not None:
        out["paper_table"] = paper_table(args, runs, results)
        table_path = args.table or os.path.join(root, "paper_table.md")
        write_text(table_path, out["paper_table"]["markdown"] + "\n")
        print(out["paper_table"]["markdown"])
        print(f"\nwrote {table_path}")
    json_path = args.json_out or os.path.join(
        root, f"{runs[0][2] if len(runs) == 1 else 'vbench'}_summary.json")
    write_json(json_path, out if len(runs) > 1 else results[0])
    print(f"wrote {json_path}")
    return rc


def paper_table(args, runs, results) -> dict:
    from ..eval import fidelity

    ref_dir = runs[0][0]
    ref_costs_all = vt.read_costs(ref_dir)
    rows = []
    for (video_dir, _out, name), res in zip(runs, results):
        is_ref = video_dir == ref_dir
        fid = None if is_ref else fidelity.compare_dirs(ref_dir, video_dir, use_lpips=args.lpips,
                                                        device=args.device)
        costs_all = vt.read_costs(video_dir)
        common = sorted(set(costs_all) & set(ref_costs_all))
        costs = vt.cost_summary(costs_all, common if not is_ref else sorted(costs_all))
        ref_costs = vt.cost_summary(ref_costs_all, common if not is_ref else sorted(
            ref_costs_all))
        label = costs["labels"][0] if len(costs["labels"]) == 1 else name
        rows.append(vt.table_row(label, res["summary"], fid, costs, ref_costs, is_ref))
        if fid is not None and fid.get("lpips_message"):
            rows[-1]["lpips_message"] = fid["lpips_message"]
    return {"rows": rows, "markdown": vt.markdown_table(rows)}
