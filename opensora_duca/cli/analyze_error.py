"""The DuCa paper's error study, on any STDiT3 model: per-step error of each cache policy, the
accumulated error of free-running cached sampling, and the aggressive-vs-conservative claim test.

Usage::

    python tools/analyze_error.py CONFIG [--policies DuCa,ToCa,FORA,PAB,TrunkReuse] [--steps 30]
        [--out DIR] [--samples 4] [--seed 42] [--starts 3,6,...] [--device cpu] [--threads N]
    python tools/analyze_error.py --preset demo|cpu [--tiny] ...

Inputs: with CONFIG (an inference config: text encoder + codec + model), its ``prompt`` list
(cycled to ``--samples`` prompts, noise seeds ``seed + j``); with ``--preset`` the inputs of
``tools/benchmark.py``'s preset (random captions; ``--tiny`` / ``--latent`` / ``--hidden`` /
``--depth`` shrink it). One CFG batch holds all samples; every error below is a relative L2 norm
``||a - ref|| / ||ref||`` per sample (per CFG row for model outputs), averaged over samples.

1. Reference: the uncached trajectory z_0 .. z_n, each step's model output (the velocity
   channels of the CFG batch), the guided velocity and the trunk output (the output of
   ``model.temporal_blocks[-1]``, captured by a forward hook).
2. Per-step error (teacher forced): each policy is attached with ``apply_cache`` and, at step i,
   fed the *reference* z_i, so the error of its output at step i is the cache's alone:
   ``output``, ``guided`` and ``trunk`` errors per step, with the step kind from the manager.
3. Free-running: the policy samples from z_0 on its own; error of its z_i against the reference
   z_i at every step (accumulated error) and of the final latents (also PSNR, as the benchmark).
4. Claim test (the paper: an aggressive step adds about as much error as a conservative one, and
   a conservative step after it corrects much of it). From the same fully computed step s (fed
   the reference z_s), two more steps run under scripted plans (a ``CachePolicy`` subclass whose
   conservative step is DuCa's own: self- and cross-attention reused, MLP recomputed on
   ``fresh_ratio x 1.495`` of the tokens selected by DuCa's V-norm scorer), and z after them is
   compared with the reference z_{s+3}:

   * ``A+C``: aggressive (trunk reused) then conservative — the claim's sequence;
   * ``C+C same cost``: two conservative steps at half the fresh ratio (same FLOPs as A+C);
   * ``C+C``: two conservative steps at the full ratio (ToCa-like, twice A+C's cost);
   * ``R+C``: every module's stored output reused with the *current* step's modulation and
     gates (no token recomputed; FORA's reuse step, ~0 FLOPs) then conservative: same cost as
     A+C, isolates what the aggressive step loses by reusing the whole trunk output;
   * ``C+A``: conservative then aggressive — DuCa's released order (F, C, A);
   * ``A+A``: two aggressive steps; ``F+F``: two full steps (control, ~0).

   Averaged over the start steps ``--starts`` (default 3, 6, ..., n-3) and the samples; the
   JSON lists each variant's cost in full-step FLOPs and how often A+C beats C+C same cost.

Output (``--out``, default ``outputs/error_analysis``): ``error_analysis.json`` (atomic),
``per_step_error.png``, ``accumulated_error.png``, ``claim_test.png``; a summary on stdout.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from ..bench import error_analysis as ea
from ..bench.benches import PRESETS, build_bench
from ..bench.measure import device_name, parse_policies
from ..utils.atomic import write_json
from ..utils.host_memory import keep_freed_host_memory

DEFAULT_POLICIES = "none,DuCa,ToCa,FORA,PAB,TrunkReuse"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None, help="inference config (or use --preset)")
    p.add_argument("--preset", default=None, help=f"one of {list(PRESETS)}")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated policy names")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: config / 30)")
    p.add_argument("--out", default="outputs/error_analysis", help="output folder")
    p.add_argument("--samples", type=int, default=4, help="prompts / noise seeds in the batch")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--init-seed", type=int, default=0, help="random-weight seed (presets)")
    p.add_argument("--starts", default=None, help="claim-test start steps, e.g. 3,6,9")
    p.add_argument("--no-claim", action="store_true", help="skip the claim test")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--ckpt-path", default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--latent", type=int, nargs=4, default=None, metavar=("C", "T", "H", "W"))
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--allow-cpu", action="store_true")
    return p


def main(argv=None) -> int:
    keep_freed_host_memory()  # CPU runs: no page faults per step
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if (args.config is None) == (args.preset is None):
        raise SystemExit("give exactly one of CONFIG (an inference config) or --preset "
                         f"(one of {list(PRESETS)})")
    if args.samples < 1:
        raise ValueError(f"--samples={args.samples!r} is not accepted; accepted: an int >= 1")
    policies = parse_policies(args.policies)
    ns = argparse.Namespace(config=args.config, preset=args.preset, device=args.device,
                            dtype=args.dtype, steps=args.steps, batch=args.samples,
                            seed=args.seed, init_seed=args.init_seed, ckpt_path=args.ckpt_path,
                            tiny=args.tiny, latent=args.latent, hidden=args.hidden,
                            depth=args.depth, allow_cpu=args.allow_cpu)
    bench = build_bench(ns)
    n = bench.num_steps
    starts = [] if args.no_claim else ea.parse_starts(args.starts, n)
    st = ea.Stepper(bench)
    t0 = time.perf_counter()
    ref = ea.reference(bench, st)
    report = {"model": bench.name, "setup": bench.info, "device": device_name(bench.device),
              "torch": torch.__version__, "num_steps": n, "samples": args.samples,
              "metric": "relative L2 ||x - ref|| / ||ref|| per sample (per CFG row for model "
                        "outputs), mean over samples",
              "policies": {}}
    for p in policies:
        report["policies"][p] = ea.analyze_policy(bench, st, ref, p)
        r = report["policies"][p]
        print(f"{p:<11s} per-step output error mean {ea.mean(r['per_step']['output_rel_l2']):.3e}"
              f" | by kind {({k: f'{v:.2e}' for k, v in r['per_step_mean_by_kind'].items()})}"
              f" | free-running final {r['free_running']['final_rel_l2']:.3e} "
              f"(PSNR {r['free_running']['final_psnr']:.2f} dB)", flush=True)
    if starts:
        report["claim_test"] = ea.claim_test(bench, st, ref, starts)
        c = report["claim_test"]
        for name, v in c["variants"].items():
            print(f"claim {name:<14s} cost {v['cost_full_step_equivalents']:.3f} full steps, "
                  f"error {v['err_mean']:.3e} (+- {v['err_std']:.1e}), "
                  f"rel. to update {v['err_update_mean']:.3e}", flush=True)
        print(f"claim: lower error at the same cost: {c['comparison']['lower_error_same_cost']} "
              f"(A+C beats C+C same cost in {c['comparison']['a_plus_c_beats_c_plus_c_same_cost']}"
              f" cases)", flush=True)
    report["elapsed_s"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    report["plots"] = ea.make_plots(report, args.out)
    path = os.path.join(args.out, "error_analysis.json")
    write_json(path, report)
    print(f"[json] {path}\n[plots] {', '.join(report['plots'])}", flush=True)
    return 0
