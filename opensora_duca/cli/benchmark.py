"""Speed / cost / fidelity of cache policies on the same model, noise and captions.

Usage::

    python tools/benchmark.py --preset cpu --policies none,DuCa,ToCa,FORA,PAB \\
        [--repeat 3] [--warmup W] [--json F.json] [--plot F.png] [--device cpu|cuda]
        [--dtype fp32|fp16|bf16] [--ckpt-path PATH] [--steps N] [--tiny]
        [--latent C T H W] [--hidden N] [--depth N] [--batch N] [--seed S] [--threads N]
        [--compile [--compile-backend inductor|aot_eager]]
    python tools/benchmark.py --policies 'DuCa,FORA:interval=6,forecast={"order":1}'  # configs
    python tools/benchmark.py --policies '["DuCa", {"type": "TeaCache", "threshold": 0.2}]'
    python tools/benchmark.py --preset demo            # the trained demo model (when shipped)
    python tools/benchmark.py --config CONFIG.py       # any inference config (text encoder+codec)
    python tools/benchmark.py --preset opensora-480p-51f --device cuda   # STDiT3-XL/2, bf16
    python tools/benchmark.py --preset opensora13-720p-113f --device cuda  # Open-Sora 1.3

Presets:

* ``cpu``: random-weight STDiT3-S/2-class model (hidden 256, depth 4, 8 heads, caption 16 x 64),
  latent [4, 5, 32, 32] (1280 tokens per sample after the 1x2x2 patching), one sample (CFG batch
  2), the full 30-step rflow schedule (cfg 7.0, timestep transform of a 17-frame 256x256 video),
  so DuCa's plan is the released one. ``--tiny`` shrinks it (hidden 64, depth 2, latent
  [4, 3, 8, 8]) for smoke tests; ``--steps``, ``--latent``, ``--hidden``, ``--depth`` override.
* ``demo``: ``configs/demo/inference.py`` (text encoder, codec and checkpoint of the demo model);
  fidelity is also measured on the decoded frames.
* ``opensora-480p-51f``: STDiT3-XL/2 on the latent [4, 15, 60, 106] of a 480p 9:16 51-frame video,
  caption length 300 x 4096 (random embeddings, all tokens attended), CFG batch 2, bf16 on CUDA;
  random weights unless ``--ckpt-path``. On a CPU it refuses unless ``--allow-cpu``.
* ``opensora13-720p-113f``: Open-Sora 1.3's STDiT3-XL/2 (window attention (8, 8, -1), 3-D rope,
  16 latent channels) on the latent [16, 35, 90, 160] of its default 720p 9:16 113-frame video,
  with 1.3's sampler options (cfg 7.5, oscillation guidance, flaw fix, 1.3 timestep
  transform); otherwise as ``opensora-480p-51f``.

Every policy runs the same model weights, initial noise and captions, through
``opensora_duca.schedulers.rflow.RFlow.sample`` with the policy attached by
``opensora_duca.cache.apply_cache`` (``none`` too: the plugin with the ``none`` policy, which is
bitwise identical to the unpatched model) inside ``manager.session(num_steps)``, detached with
``remove_cache`` afterwards. Runs are interleaved (round r runs every policy once), so slow drift
of a shared machine's load hits every policy alike; ``--warmup`` untimed rounds come first
(default 1 on CUDA or with ``--compile``, whose first round compiles; 0 on a CPU, where one
short untimed model call warms up instead). The session is given the sampler's timesteps on
the host (``manager.session(n, timesteps=...)``), as the pipeline does.

``--profile`` first profiles one uncached, uncompiled full step (the sampler's first model call)
with ``torch.profiler`` and prints the time per kind of work (``opensora_duca.bench.profile``:
matmul, attention, norm, activation, element-wise, copy) and the operator calls; JSON
``profile``.

``--compile`` runs every policy with the per-block work compiled (torch.compile, static
shapes; see docs/speed.md); ``graphs_compiled_in_timed_runs`` (JSON top level) must be 0.

Measured per policy (JSON ``results[]`` fields):

* ``median_s`` / ``times_s``: wall time of one whole sampling run (30 model calls + sampler);
  CUDA events around the run and a synchronize on CUDA, ``time.perf_counter`` on a CPU.
* ``speedup``: median of ``none`` / median of the policy.
* ``min_s`` / ``speedup_min``: the fastest run and the speedup of fastest runs (the least
  disturbed by other jobs on a shared machine).
* ``median_cpu_s`` / ``cpu_times_s`` / ``speedup_cpu``: the same with the process's CPU time
  (``time.process_time``, all threads). On a CPU shared with other jobs, wall time swings with
  their load while CPU time much less so: compare the two before trusting a wall-time speedup.
* ``flops_ratio``: the manager's analytic FLOPs ratio (uncached / actual trunk matmul FLOPs).
* ``peak_cache_bytes``: the manager's peak stored-feature bytes.
* ``peak_mem_bytes``: peak memory *above what was in use when the run started* (activations,
  stored features, temporaries; weights and inputs excluded), max over the timed runs. CUDA:
  ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus
  ``memory_allocated()`` at the start. CPU: the process's peak resident set (``VmHWM`` of
  ``/proc/self/status``, reset by writing 5 to ``/proc/self/clear_refs`` before the run, after
  ``malloc_trim(0)``) minus the resident set at the start; it counts every page the process
  touched, so it is an upper bound of the tensors' bytes (``peak_mem_method`` says which was used;
  None where neither works).
* ``step_kinds``: per step kind (full, full (cross-attn reused), conservative, aggressive, ...)
  ``steps`` per run, ``median_s`` of one model call (per-step CUDA events, or
  ``time.perf_counter`` on a CPU, around the model's forward including the cache's hooks),
  ``flops_share`` (its analytic FLOPs / an uncached step's), ``ideal_s`` (that share of the
  uncached step's median, ``full_step_s`` at the top level) and ``vs_ideal`` = median / ideal.
* ``syncs_per_run``: host-device synchronisations of one extra, untimed run (``sync_method``
  at the top level: CUDA's sync debug mode, or on a CPU the calls that would synchronise).
* ``bookkeeping_s`` / ``bookkeeping_frac``: the manager's measured cache bookkeeping time of the
  last run and its fraction of that policy's median run time.
* ``psnr`` / ``ssim``: the final latents against ``none``'s, both mapped to [0, 1] by the range of
  ``none``'s latents (SSIM only when the latent is at least 11x11; else None). With a codec
  (demo / ``--config``) also ``psnr_frames`` / ``ssim_frames`` of the decoded frames in [0, 1].
  ``none`` against itself is PSNR 100 / SSIM 1.

On a CPU shared with other jobs pass ``--threads 1``: with more threads than free cores every
parallel op waits for its slowest (descheduled) thread, which inflates the many small ops of
the cached steps far more than the big matrix products of full steps (measured here: DuCa's
conservative step cost 39% of a full step with 2 threads under load, 13% with 1 thread).

Output: a markdown table on stdout, the JSON (``--json``, written atomically) and a speed-vs-
fidelity PNG (``--plot``, matplotlib Agg).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ..bench.benches import PRESETS, build_bench, option_error
from ..bench.measure import device_name, parse_policies, policy_config, run_benchmark
from ..bench.mmdit import V2_PRESETS
from ..bench.report import markdown_table, plot, step_kind_table
from ..utils.atomic import check_writable, write_json
from ..utils.host_memory import keep_freed_host_memory

DEFAULT_POLICIES = "none,DuCa,ToCa,FORA,PAB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu",
                   help=f"one of {list(PRESETS) + list(V2_PRESETS)} (the last three: Open-Sora "
                        f"2.0's MMDiT)")
    p.add_argument("--config", default=None, help="benchmark an inference config instead")
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help="comma-separated policies: names or NAME:key=value,... configs (JSON "
                        "values), e.g. none,DuCa,FORA:interval=6,warmup_steps=2; or a JSON "
                        "list of names and dicts with a 'type'")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per policy (median)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed rounds first (default: 1 on CUDA, 0 on a CPU)")
    p.add_argument("--json", default=None, help="write the report here (atomic)")
    p.add_argument("--plot", default=None, help="write a speed-vs-fidelity PNG here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if any)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--ckpt-path", default=None, help="model weights (default: random / config)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 30)")
    p.add_argument("--tiny", action="store_true", help="cpu preset shrunk for smoke tests")
    p.add_argument("--latent", type=int, nargs=4, default=None, metavar=("C", "T", "H", "W"))
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--batch", type=int, default=1, help="samples (CFG batch = 2x)")
    p.add_argument("--seed", type=int, default=42, help="noise / caption seed")
    p.add_argument("--init-seed", type=int, default=0, help="random-weight seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true",
                   help="run the per-block work compiled (torch.compile, mode default)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend with --compile (e.g. aot_eager: no C++ needed)")
    p.add_argument("--allow-cpu", action="store_true", help="let the XL presets run on a CPU")
    p.add_argument("--profile", action="store_true",
                   help="first profile one uncached full step (torch.profiler): time by kind of "
                        "work (matmul, attention, norm, element-wise, copy) and operator calls")
    p.add_argument("--quiet", action="store_true", help="no per-run lines")
    return p


def _main_v2(args, policies) -> int:
    """An Open-Sora 2.0 (MMDiT) preset (``opensora_duca.bench.mmdit``)."""
    from ..bench.mmdit import run_v2_benchmark, step_tflops, v2_table

    preset = V2_PRESETS[args.preset]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if preset["large"]:
        print(f"{args.preset}: uncached step {step_tflops(preset):.1f} TFLOP (three guidance "
              f"branches, analytic)", flush=True)
        if device.type == "cpu" and not args.allow_cpu:
            raise option_error("--preset", args.preset, "a GPU device (the 11B model), or "
                               "--allow-cpu to force it, or --preset mmdit-cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    report = run_v2_benchmark(args.preset, [policy_config(p) for p in policies], device, dtype,
                              repeat=args.repeat, steps=args.steps, seed=args.seed,
                              log=(lambda s: None) if args.quiet else print)
    print(v2_table(report), flush=True)
    if args.json:
        write_json(args.json, report)
        print(f"[json] {args.json}")
    return 0


def main(argv=None) -> int:
    keep_freed_host_memory()  # CPU runs: no page faults per step
    args = build_parser().parse_args(argv)
    try:  # mistakes in the arguments: one line, exit code 2, before anything is built
        policies = _checked(args)
        if args.preset in V2_PRESETS:
            return _main_v2(args, policies)
        bench = build_bench(args)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        msg = str(msg).strip().splitlines()[0] if str(msg).strip() else type(err).__name__
        print(f"benchmark: error: {msg}", file=sys.stderr, flush=True)
        return 2
    return _run(args, bench, policies)


def _checked(args) -> list:
    """Every argument checked (a one-line ValueError); the policies parsed."""
    from ..config_check import check_compile, check_device
    if args.threads is not None and args.threads < 1:
        raise option_error("--threads", args.threads, "an int >= 1")
    for key, val, low in (("--batch", args.batch, 1), ("--steps", args.steps, 1),
                          ("--repeat", args.repeat, 1), ("--warmup", args.warmup, 0),
                          ("--hidden", args.hidden, 1), ("--depth", args.depth, 1)):
        if val is not None and val < low:
            raise option_error(key, val, f"an int >= {low}")
    if args.latent is not None and min(args.latent) < 1:
        raise option_error("--latent", args.latent, "four ints >= 1 (C T H W)")
    for key, val in (("--seed", args.seed), ("--init-seed", args.init_seed)):
        if not 0 <= val < 2 ** 63:
            raise option_error(key, val, "an int in [0, 2**63)")
    device = check_device(args.device)
    if args.compile:
        check_compile(dict(backend=args.compile_backend), device)
    for key, val in (("--json", args.json), ("--plot", args.plot)):
        if val is not None:
            check_writable(val, key)
    if args.config is not None and not os.path.isfile(args.config):
        raise option_error("--config", args.config, "an existing inference config file")
    policies = parse_policies(args.policies, configs=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return policies


def _run(args, bench, policies) -> int:
    compile_cfg = dict(backend=args.compile_backend) if args.compile else None
    warmup = args.warmup if args.warmup is not None else (
        1 if bench.device.type == "cuda" or args.compile else 0)
    log = (lambda *a, **k: None) if args.quiet else (lambda s: print(s, flush=True))
    info = bench.info
    print(f"benchmark {bench.name}: {info.get('tokens_per_sample')} tokens/sample, CFG batch "
          f"{info.get('cfg_batch')}, {bench.num_steps} steps, {bench.dtype}, "
          f"{device_name(bench.device)}", flush=True)
    prof = None
    if args.profile:
        from ..bench.profile import first_model_call, profile_call, profile_table
        prof = profile_call(first_model_call(bench), bench.device)
        print(profile_table(prof), flush=True)
    report = run_benchmark(bench, policies, args.repeat, warmup, log=log, compile=compile_cfg)
    if prof is not None:
        report["profile"] = prof
    print(markdown_table(report), flush=True)
    print(f"\ntime per step kind (ideal: the kind's FLOPs share of the uncached step, "
          f"{report['full_step_s'] * 1e3:.1f} ms)", flush=True)
    print(step_kind_table(report), flush=True)
    if args.compile:
        print(f"graphs compiled during the timed runs: "
              f"{report['graphs_compiled_in_timed_runs']}", flush=True)
    if args.json:
        write_json(args.json, report)
        print(f"[json] {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"[plot] {args.plot}")
    return 0
