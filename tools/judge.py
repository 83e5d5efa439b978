"""Judge demo videos against their captions (colour, shape, motion, flicker), no learned model.

    python tools/judge.py --video-dir samples/demo --manifest samples/demo/manifest.json
    python tools/judge.py --video-dir samples/demo --from-names      # '{prompt}-{i}.mp4'

The manifest is a JSON object ``{file: caption}`` (files relative to --video-dir). Prints a
table, then a JSON object with the accuracies (colour, shape, motion, both = colour and motion)
and mean flicker; ``--json-out`` also writes it, with every clip's result, to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from opensora_duca.eval.judge import (caption_from_name, format_table, judge_files,  # noqa: E402
                                      summarize, to_jsonable)

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video-dir", required=True, help="folder holding the videos")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="JSON file {file: caption}")
    src.add_argument("--from-names", action="store_true",
                     help="read captions from file names '{prompt}-{i}.mp4'")
    p.add_argument("--json-out", help="write the summary and per-clip results here")
    p.add_argument("--quiet", action="store_true", help="print only the JSON summary")
    return p.parse_args(argv)


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
    names = sorted(n for n in os.listdir(args.video_dir) if n.lower().endswith(VIDEO_EXTS))
    return [(n, caption_from_name(n)) for n in names]


def main(argv=None) -> dict:
    args = parse_args(argv)
    items = collect(args)
    if not items:
        raise SystemExit(f"no videos to judge in {args.video_dir!r}")
    results = judge_files(items, args.video_dir)
    summary = summarize(results)
    if not args.quiet:
        print(format_table(results))
    print(json.dumps(summary, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(to_jsonable(dict(summary=summary, results=results)), f, indent=2)
    return summary


if __name__ == "__main__":
    main()
