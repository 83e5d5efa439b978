"""Sweep every cache policy's knob on the demo model and draw the quality-speed frontier.

Usage::

    python tools/frontier.py [--config configs/demo/inference.py] [--num-prompts 105]
        [--seeds 0 1] [--families DuCa,FORA+forecast,...] [--calibration cal.json]
        [--out outputs/frontier.json] [--plot outputs/frontier.png] [--quick]
        [--threads N] [--batch-size 16]

Every point generates the caption set's first ``--num-prompts`` captions x ``--seeds`` with the
same noise as the uncached reference and is scored against it (PSNR / SSIM of the decoded frames,
the caption judge's verdict and its agreement with the uncached verdict, analytic FLOPs ratio,
measured wall and CPU-time speedup); see :mod:`opensora_duca.eval.frontier`. The JSON is written
after every point: rerunning the same command resumes (and adds the points of other
``--families`` to the same file). An existing ``--out`` of other settings (config, captions,
seeds, steps, ``--quick``) or one that cannot be read is refused and kept as it is; a second run
on the same ``--out`` while one runs is refused (a lock). The default ``--out`` is
``outputs/frontier.json`` (the published sweep in docs/results is only written when named).
``--quick``: 3 captions, 1 seed, 10 steps, one point per family (a smoke test). Mistakes in the
arguments are one line on stderr, exit 2, before the model is built.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

from ..cache import build_policy
from ..cache.calibrate import check_calibration_model
from ..data.synthetic import caption_set
from ..eval.frontier import (
    default_sweep,
    format_table,
    frontier_meta,
    load_existing,
    plot,
    quick_sweep,
    run_frontier,
)
from ..pipeline import build_from_config
from ..registry import SCHEDULERS, build_module
from ..utils.atomic import exclusive_lock
from ..utils.config import load_config
from ..utils.host_memory import keep_freed_host_memory


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo/inference.py")
    ap.add_argument("--num-prompts", type=int, default=105)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--families", default=None,
                    help="comma-separated families to run (default: all)")
    ap.add_argument("--calibration", default=None,
                    help="TeaCache calibration JSON (tools/calibrate.py) for the TeaCache points")
    ap.add_argument("--out", default="outputs/frontier.json")
    ap.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    return ap.parse_args(argv)


def _points(args):
    points = quick_sweep() if args.quick else default_sweep(args.calibration)
    if args.calibration and args.quick:
        points = [(f, dict(c, calibration=args.calibration) if c["type"] == "TeaCache" else c)
                  for f, c in points]
    if args.families:
        wanted = [f.strip() for f in args.families.split(",") if f.strip()]
        known = sorted({f for f, _ in default_sweep()})
        bad = [f for f in wanted if f not in known]
        if bad:
            raise ValueError(f"--families {args.families!r}: unknown {bad}; accepted: {known}")
        points = [(f, c) for f, c in points if f in wanted]
    return points


def main(argv=None) -> int:
    keep_freed_host_memory()  # CPU runs: no page faults per step
    args = parse_args(argv)
    lock = contextlib.ExitStack()
    try:
        if args.quick:
            args.num_prompts, args.seeds = min(args.num_prompts, 3), args.seeds[:1]
            args.steps = args.steps or 10
        prompts = caption_set(args.num_prompts)
        for key, val, lo in (("--steps", args.steps, 2), ("--threads", args.threads, 1),
                             ("--batch-size", args.batch_size, 1)):
            if val is not None and val < lo:
                raise ValueError(f"{key} {val}: accepted: an integer >= {lo}")
        bad = [s for s in args.seeds if not 0 <= s < 2 ** 63]
        if bad:
            raise ValueError(f"--seeds {bad[0]}: accepted: integers in [0, 2**63)")
        if args.calibration is not None and not os.path.isfile(args.calibration):
            raise ValueError(f"--calibration {args.calibration!r}: no such file")
        points = _points(args)
        cfg = load_config(args.config)
        cfg.cache = None
        if args.steps:
            cfg.scheduler.num_sampling_steps = args.steps
        steps = build_module(dict(cfg.scheduler), SCHEDULERS).num_sampling_steps
        meta = dict(config=args.config, quick=args.quick)
        # the lock is held for the whole run: a second writer of --out is refused
        lock.enter_context(exclusive_lock(args.out))
        load_existing(args.out, frontier_meta(meta, prompts, args.seeds, steps))
    except (ValueError, KeyError, TypeError, OSError) as err:
        lock.close()
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        msg = str(msg).strip().splitlines()[0] if str(msg).strip() else type(err).__name__
        print(f"frontier: error: {msg}", file=sys.stderr)
        return 2
    with lock:
        return _run(args, cfg, points, prompts, meta)


def _run(args, cfg, points, prompts, meta) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = build_from_config(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    try:  # before any clip: a TeaCache calibration fitted on another model
        for _, c in points:
            if c.get("calibration") is not None:
                check_calibration_model(build_policy(c), pipe.model)
    except ValueError as err:
        print(f"frontier: error: {err}", file=sys.stderr)
        return 2
    result = run_frontier(pipe, points, prompts, args.seeds, args.out,
                          batch_size=args.batch_size, meta=meta, lock=False)
    plot(result, args.plot or os.path.splitext(args.out)[0] + ".png")
    print(format_table(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
