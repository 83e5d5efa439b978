"""Judge demo videos against their captions (colour, shape, motion, one object, flicker).

    python tools/judge.py --video-dir samples/demo --manifest samples/demo/manifest.json
    python tools/judge.py --video-dir samples/demo/uncached --from-names  # '{prompt}[-{i}].mp4'
    python tools/judge.py --config configs/demo/inference.py --policies none,DuCa,ToCa \
        --num-prompts 50 --seeds 0 1 --json-out judge.json            # generate + judge

With ``--config`` the tool generates the caption set
(``opensora_duca.data.synthetic.caption_set``: the first ``--num-prompts`` captions, each with
every seed of ``--seeds``) with every policy of ``--policies`` on the same weights and noise, and
prints accuracies per policy, the verdicts' agreement with the uncached clips and PSNR/SSIM
against them (``opensora_duca.eval.caption_set``). The caption set is the demo model's training
caption space, not a held-out set.

The manifest is a JSON object ``{file: caption}`` (files relative to --video-dir). Prints a
table, then a JSON object with the shares of clips judged right (``opensora_duca.eval.judge
.summarize``: colour, shape, motion, one object, colour+motion, ok = colour, motion and one
object, all_ok = ok and shape) and mean flicker; ``--json-out`` also writes it, with every
clip's result, to a file.
"""
from __future__ import annotations

import argparse
import json
import os

from ..eval.judge import (
    caption_from_name,
    format_table,
    judge_files,
    summarize,
    to_jsonable,
)
from ..utils.atomic import write_json
from ..utils.host_memory import keep_freed_host_memory

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video-dir", help="folder holding the videos")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="generate the caption set with this inference config")
    src.add_argument("--manifest", help="JSON file {file: caption}")
    src.add_argument("--from-names", action="store_true",
                     help="read captions from file names '{prompt}-{i}.mp4' or '{prompt}.mp4' "
                          "(underscores = spaces)")
    p.add_argument("--json-out", help="write the summary and per-clip results here")
    p.add_argument("--quiet", action="store_true", help="print only the JSON summary")
    p.add_argument("--policies", default="none,DuCa,ToCa",
                   help="with --config: comma-separated cache policies, 'none' first")
    p.add_argument("--num-prompts", type=int, default=50,
                   help="with --config: how many captions of the caption set")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="with --config: seeds")
    p.add_argument("--batch-size", type=int, default=16, help="with --config: videos per batch")
    p.add_argument("--save-dir", default=None, help="with --config: also write the mp4 files")
    args = p.parse_args(argv)
    if args.config is None and args.video_dir is None:
        p.error("--video-dir is required unless --config is given")
    return args


def run_caption_set(args) -> dict:
    from mmengine.config import Config

    from ..data.synthetic import caption_set
    from ..eval.caption_set import evaluate_policies, format_policy_table
    from ..pipeline import build_from_config

    if not os.path.isfile(args.config):
        raise SystemExit(f"--config {args.config!r} does not exist")
    cfg = Config.fromfile(args.config)
    cfg.cache = None
    pipe = build_from_config(cfg)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    result = evaluate_policies(pipe, policies, caption_set(args.num_prompts), args.seeds,
                               batch_size=args.batch_size, save_dir=args.save_dir,
                               progress=not args.quiet)
    print(format_policy_table(result))
    if args.json_out:
        write_json(args.json_out, to_jsonable(result))
    return result


def collect(args) -> list[tuple[str, str]]:
    if not os.path.isdir(args.video_dir):
        raise SystemExit(f"--video-dir {args.video_dir!r} is not a folder")
    if args.manifest:
        with open(args.manifest) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in manifest.items()):
            raise SystemExit(f"--manifest {args.manifest!r} is not accepted; accepted: a JSON "
                             "object {file: caption}")
        return sorted(manifest.items())
    names = sorted(n for n in os.listdir(args.video_dir)
                   if n.lower().endswith(VIDEO_EXTS) and not n.startswith("."))  # no partials
    return [(n, caption_from_name(n)) for n in names]


def main(argv=None) -> dict:
    keep_freed_host_memory()  # CPU runs: no page faults per step
    args = parse_args(argv)
    if args.config:
        return run_caption_set(args)
    items = collect(args)
    if not items:
        raise SystemExit(f"no videos to judge in {args.video_dir!r}")
    results = judge_files(items, args.video_dir)
    summary = summarize(results)
    if not args.quiet:
        print(format_table(results))
    print(json.dumps(summary, indent=2))
    if args.json_out:
        write_json(args.json_out, to_jsonable(dict(summary=summary, results=results)))
    return summary


if __name__ == "__main__":
    main()
