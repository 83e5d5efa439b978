"""Fit TeaCache's rescaling polynomial (or MagCache's magnitude-ratio curve) on the model of an
inference config.

Usage::

    python tools/calibrate.py CONFIG [--prompt P ...] [--seeds 100 101] [--degree 4]
        [--steps N] [--out calibration.json] [--cfg-options key=value ...]
    python tools/calibrate.py CONFIG --policy MagCache [--prompt P ...] [--seeds 100]
        [--steps N] [--out magcache.json]

``--policy MagCache``: one uncached run per seed; at every step the trunk's residual (its
output minus its input, the whole hidden state) is taken from the cache's own residual store,
and per clip (its rows of the CFG batch) the mean over tokens of ``||r_i|| / ||r_(i-1)||``
(per-token L2 norms) is recorded; the curve is 1.0 at step 0, then the mean over clips and
seeds. It writes ``{"policy": "MagCache", "mag_ratios": [...], "per_clip": [[...], ...],
"steps", "config", "prompts", "seeds", "model"}``; point the policy at it:
``cache = dict(type="MagCache", calibration="magcache.json")``.

TeaCache (the default):

Runs the config's model uncached (an Open-Sora 1.x config or a 2.0 one: STDiT3 or the MMDiT,
whose first double block's modulated image input is measured; prompts: ``--prompt`` or the
config's ``prompt`` list; one
run per seed, all prompts in one batch), records per step the relative L1 change of the first
block's modulated input (as the TeaCache policy measures it) and of the model output, fits a
least-squares polynomial of ``--degree`` and writes JSON ``{"coefficients": [...] (highest degree
first), "degree", "rmse", "samples", "x_range", "x", "y", "config", "prompts", "seeds",
"steps", "model"}`` (``model``: :func:`opensora_duca.cache.calibrate.model_identity` of the
model fitted on; a policy pointed at the file refuses another model). Point
the policy at it: ``cache = dict(type="TeaCache", calibration="calibration.json")``. Use seeds
that the evaluation does not use (the defaults, 100 and 101, are not those of tools/frontier.py).
Mistakes in the arguments (and a config that cannot be loaded, too few samples for the
degree, an --out that cannot be written) are one line on stderr and exit code 2, before the
model is built.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Sequence

import torch
from mmengine.config import DictAction

from ..cache import apply_cache, remove_cache
from ..cache.calibrate import fit_polynomial, magnitude_ratios, model_identity
from ..config_check import check_v2_inference_config
from ..pipeline import build_from_config
from ..pipeline_v2 import build_v2_from_config, is_v2_config
from ..registry import SCHEDULERS, build_module
from ..utils.atomic import check_writable, write_json
from ..utils.config import load_config
from ..utils.host_memory import keep_freed_host_memory


@torch.no_grad()
def collect_changes(pipe, prompts: Sequence[str], seeds: Sequence[int]) -> Dict[str, List[float]]:
    """Uncached runs of ``pipe`` (one per seed, all prompts in one batch): per step >= 1 and
    clip (its rows of the CFG batch), the modulated-input change (x) and the model-output
    change (y)."""
    if pipe.cache_manager is not None:
        remove_cache(pipe.model)
        pipe.cache_manager = None
    xs: List[float] = []
    ys: List[float] = []
    outs: List[torch.Tensor] = []
    hook = pipe.model.register_forward_hook(lambda mod, a, out: outs.append(out.detach()))
    try:
        for seed in seeds:
            # threshold 0: every step is computed, and the change is measured as TeaCache does
            mgr = apply_cache(pipe.model, dict(type="TeaCache", threshold=0.0))
            pipe.cache_manager = mgr
            try:
                outs.clear()
                pipe.generate(list(prompts), seeds=[seed] * len(prompts))
                changes, groups = mgr.stats()["changes"], mgr.stats()["groups"]
            finally:
                remove_cache(pipe.model)
                pipe.cache_manager = None
            for i in range(1, len(outs)):  # one point per decision group (clip) and step
                prev, now = outs[i - 1].double(), outs[i].double()
                for change, rows in zip(changes[i], groups):
                    if change is None:
                        continue
                    a, b = now[rows], prev[rows]
                    xs.append(float(change))
                    ys.append(float((a - b).abs().sum() / b.abs().sum().clamp_min(1e-300)))
    finally:
        hook.remove()
    return {"x": xs, "y": ys}


@torch.no_grad()
def collect_mag_ratios(pipe, prompts: Sequence[str], seeds: Sequence[int]) -> List[List[float]]:
    """Uncached runs of ``pipe`` (one per seed, all prompts in one batch): per clip (its rows
    of the CFG batch) and step, the mean over its tokens of ``||r_i|| / ||r_(i-1)||`` with r the
    trunk's residual (step 0: 1.0)."""
    if pipe.cache_manager is not None:
        remove_cache(pipe.model)
        pipe.cache_manager = None
    out: List[List[float]] = []
    for seed in seeds:
        # every step computed (all retained); the cache keeps the trunk's residual of each step
        mgr = apply_cache(pipe.model, dict(type="MagCache", mag_ratios=[1.0, 1.0],
                                           retention_ratio=1.0))
        pipe.cache_manager = mgr
        norms: List[torch.Tensor] = []
        last = mgr.layout.blocks(pipe.model)[-1][1]
        hook = last.register_forward_hook(lambda mod, a, o: norms.append(
            mgr.adaptive.residual.value(0.0, torch.float64).norm(dim=-1)))  # [B, N]
        try:
            pipe.generate(list(prompts), seeds=[seed] * len(prompts))
            groups = mgr.adaptive.groups
        finally:
            hook.remove()
            remove_cache(pipe.model)
            pipe.cache_manager = None
        for rows in groups:
            curve = [1.0]
            for i in range(1, len(norms)):
                now, before = norms[i][rows], norms[i - 1][rows]
                curve.append(float((now / before.clamp_min(1e-30)).mean()))
            out.append(curve)
    return out


def _main_magcache(args, cfg, prompts, steps, v2) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = build_v2_from_config(cfg, device=device) if v2 else build_from_config(cfg,
                                                                                  device=device)
    per_clip = collect_mag_ratios(pipe, prompts, args.seeds)
    try:
        curve = magnitude_ratios(per_clip)
    except ValueError as err:
        print(f"calibrate: error: {err}", file=sys.stderr)
        return 2
    write_json(args.out, {"policy": "MagCache", "mag_ratios": curve, "per_clip": per_clip,
                          "steps": steps, "config": args.config, "prompts": prompts,
                          "seeds": list(args.seeds), "model": model_identity(pipe.model)})
    print(f"calibration: MagCache magnitude ratios over {len(per_clip)} clip runs, {steps} "
          f"steps, from {min(curve):.4g} to {max(curve):.4g} -> {args.out}")
    return 0


def _short(v, n: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--prompt", action="append", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    ap.add_argument("--degree", type=int, default=4)
    ap.add_argument("--policy", default="TeaCache", choices=["TeaCache", "MagCache"],
                    help="what to fit: TeaCache's polynomial or MagCache's ratio curve")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (config's default)")
    ap.add_argument("--out", default="calibration.json")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cfg-options", nargs="+", action=DictAction, default=None)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    keep_freed_host_memory()  # CPU runs: no page faults per step
    args = parse_args(argv)
    try:
        if args.degree < 0:
            raise ValueError(f"--degree {args.degree}: accepted: an integer >= 0")
        if args.steps is not None and args.steps < 2:
            raise ValueError(f"--steps {args.steps}: accepted: an integer >= 2")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads {args.threads}: accepted: an integer >= 1")
        bad = [s for s in args.seeds if not 0 <= s < 2 ** 63]
        if bad:
            raise ValueError(f"--seeds {bad[0]}: accepted: integers in [0, 2**63)")
        check_writable(args.out, "--out")
        cfg = load_config(args.config, args.cfg_options)
        prompts = cfg.get("prompt") if args.prompt is None else args.prompt
        if isinstance(prompts, str):  # one prompt, not a list of its characters
            prompts = [prompts]
        prompts = list(prompts or [])
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"prompts={_short(prompts)}: accepted: --prompt or a `prompt` "
                             f"(a string or a list of non-empty strings) in the config")
        v2 = is_v2_config(cfg)  # Open-Sora 2.0: the MMDiT, its sampler's steps
        if v2:
            if args.steps is not None:
                cfg.sampling_option = dict(cfg.get("sampling_option") or {}, num_steps=args.steps)
            cfg.cache = None
            check_v2_inference_config(cfg)
            steps = int((cfg.get("sampling_option") or {}).get("num_steps", 50))
        else:
            if args.steps is not None:
                cfg.scheduler.num_sampling_steps = args.steps
            steps = build_module(dict(cfg.scheduler), SCHEDULERS).num_sampling_steps
        samples = (steps - 1) * len(prompts) * len(args.seeds)  # one per clip and step >= 1
        if args.policy == "TeaCache" and samples <= args.degree:
            raise ValueError(f"--degree {args.degree} needs more than {args.degree} samples; "
                             f"{steps} steps x {len(prompts)} prompts x {len(args.seeds)} seeds "
                             f"give {samples}: add prompts, seeds or steps, or lower --degree")
        cfg.cache = None
    except (ValueError, KeyError, TypeError, OSError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        msg = str(msg).strip().splitlines()[0] if str(msg).strip() else type(err).__name__
        print(f"calibrate: error: {msg}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.policy == "MagCache":
        return _main_magcache(args, cfg, prompts, steps, v2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = build_v2_from_config(cfg, device=device) if v2 else build_from_config(cfg,
                                                                                  device=device)
    samples = collect_changes(pipe, prompts, args.seeds)
    try:
        fit = fit_polynomial(samples["x"], samples["y"], args.degree)
    except ValueError as err:
        print(f"calibrate: error: {err}", file=sys.stderr)
        return 2
    report = {**fit, "x_range": [min(samples["x"]), max(samples["x"])],
              "x": samples["x"], "y": samples["y"], "config": args.config,
              "prompts": prompts, "seeds": list(args.seeds),
              "steps": steps, "model": model_identity(pipe.model)}
    write_json(args.out, report)
    print(f"calibration: degree {fit['degree']} on {fit['samples']} steps, RMSE "
          f"{fit['rmse']:.4g}, coefficients {fit['coefficients']} -> {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
