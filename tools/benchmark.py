"""Speed / cost / fidelity of cache policies on the same model, noise and captions.

Usage::

    python tools/benchmark.py --preset cpu --policies none,DuCa,ToCa,FORA,PAB \\
        [--repeat 3] [--warmup W] [--json F.json] [--plot F.png] [--device cpu|cuda]
        [--dtype fp32|fp16|bf16] [--ckpt-path PATH] [--steps N] [--tiny]
        [--latent C T H W] [--hidden N] [--depth N] [--batch N] [--seed S] [--threads N]
    python tools/benchmark.py --preset demo            # the trained demo model (when shipped)
    python tools/benchmark.py --config CONFIG.py       # any inference config (text encoder+codec)
    python tools/benchmark.py --preset opensora-480p-51f --device cuda   # STDiT3-XL/2, bf16

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

Every policy runs the same model weights, initial noise and captions, through
``opensora_duca.schedulers.rflow.RFlow.sample`` with the policy attached by
``opensora_duca.cache.apply_cache`` (``none`` too: the plugin with the ``none`` policy, which is
bitwise identical to the unpatched model) inside ``manager.session(num_steps)``, detached with
``remove_cache`` afterwards. Runs are interleaved (round r runs every policy once), so slow drift
of a shared machine's load hits every policy alike; ``--warmup`` untimed rounds come first
(default 1 on CUDA, 0 on a CPU, where one short untimed model call warms up instead).

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
import ctypes
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

DEMO_CONFIG = os.path.join(ROOT, "configs", "demo", "inference.py")
PRESETS = ("cpu", "demo", "opensora-480p-51f")
DEFAULT_POLICIES = "none,DuCa,ToCa,FORA,PAB"

CPU_PRESET = dict(model=dict(type="STDiT3-S/2", hidden_size=256, depth=4, num_heads=8,
                             caption_channels=64, model_max_length=16),
                  latent=(4, 5, 32, 32), video=(17, 256, 256), caption_len=16, steps=30,
                  cfg_scale=7.0, dtype="fp32")
TINY_OVERRIDES = dict(hidden=64, depth=2, heads=4, latent=(4, 3, 8, 8))
XL_PRESET = dict(model=dict(type="STDiT3-XL/2", caption_channels=4096, model_max_length=300,
                            enable_flash_attn=True),
                 latent=(4, 15, 60, 106), video=(51, 480, 854), caption_len=300, steps=30,
                 cfg_scale=7.0, dtype="bf16")


# ------------------------------------------------------------------------------ the bench
@dataclass
class Bench:
    """One model with fixed inputs: everything a policy run needs."""

    name: str
    model: torch.nn.Module
    scheduler: Any
    z0: torch.Tensor            # [B, C, T, H, W] initial noise
    y: torch.Tensor             # [B, 1, L, Cy]
    y_null: torch.Tensor        # [B, 1, L, Cy]
    mask: Optional[torch.Tensor]
    additional_args: dict
    sample_kwargs: dict         # height, width, num_frames for the timestep transform
    device: torch.device
    dtype: torch.dtype
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # latents -> [-1, 1] frames
    info: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.scheduler.num_sampling_steps)

    @torch.no_grad()
    def sample(self, on_step=None) -> torch.Tensor:
        return self.scheduler.sample(self.model, self.z0.clone(), self.y, self.y_null,
                                     mask=self.mask, additional_args=self.additional_args,
                                     progress=False, on_step=on_step, **self.sample_kwargs)

    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps(device=self.z0.device, **self.sample_kwargs)


def _err(key: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"{key}={value!r} is not accepted; accepted: {accepted}")


def resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise _err("--device", device, "cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _err("--device", device, "cpu (CUDA is not available here)")
    if dev.type not in ("cpu", "cuda"):
        raise _err("--device", device, "cpu, cuda or cuda:N")
    return dev


def _inputs_common(model, scheduler, latent, video, caption_len, batch, seed, device, dtype):
    """Noise, random caption embeddings and conditioning of a registry-built model."""
    c, t, h, w = latent
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    z0 = torch.randn(batch, c, t, h, w, generator=g).to(device, dtype)
    y = torch.randn(batch, 1, caption_len, model.caption_channels, generator=g).to(device, dtype)
    y_null = model.y_embedder.y_embedding.detach()[None, None].repeat(batch, 1, 1, 1).to(
        device, dtype)
    nf, hp, wp = video
    add = dict(height=torch.tensor([hp] * batch, device=device, dtype=dtype),
               width=torch.tensor([wp] * batch, device=device, dtype=dtype),
               fps=torch.tensor([24] * batch, device=device, dtype=dtype))
    return dict(z0=z0, y=y, y_null=y_null, mask=None, additional_args=add,
                sample_kwargs=dict(height=hp, width=wp, num_frames=nf))


def build_random_bench(name: str, preset: dict, device, dtype, steps=None, latent=None,
                       hidden=None, depth=None, heads=None, batch=1, seed=42, init_seed=0,
                       ckpt_path=None) -> Bench:
    """A registry-built STDiT3 (random weights unless ``ckpt_path``) with random captions."""
    from opensora_duca.registry import MODELS, build_module
    from opensora_duca.schedulers.rflow import RFlow

    mcfg = dict(preset["model"])
    if hidden is not None:
        mcfg["hidden_size"] = hidden
    if depth is not None:
        mcfg["depth"] = depth
    if heads is not None:
        mcfg["num_heads"] = heads
    latent = tuple(latent or preset["latent"])
    if len(latent) != 4 or any(not isinstance(v, int) or v < 1 for v in latent):
        raise _err("--latent", latent, "four positive ints C T H W")
    if ckpt_path is not None:
        mcfg["from_pretrained"] = ckpt_path
    torch.manual_seed(int(init_seed))
    model = build_module(mcfg, MODELS, input_size=latent[1:], in_channels=latent[0])
    model = model.to(device, dtype).eval()
    steps = preset["steps"] if steps is None else steps
    sched = RFlow(num_sampling_steps=steps, cfg_scale=preset["cfg_scale"],
                  use_timestep_transform=True)
    inp = _inputs_common(model, sched, latent, preset["video"], preset["caption_len"], batch,
                         seed, device, dtype)
    n_tok = latent[1] * math.ceil(latent[2] / 2) * math.ceil(latent[3] / 2)
    info = dict(model={k: v for k, v in mcfg.items()}, latent=list(latent),
                video=list(preset["video"]), caption_len=preset["caption_len"], batch=batch,
                cfg_batch=2 * batch, tokens_per_sample=n_tok, steps=steps,
                cfg_scale=preset["cfg_scale"], seed=seed, init_seed=init_seed,
                weights="checkpoint " + ckpt_path if ckpt_path else "random",
                params=sum(p.numel() for p in model.parameters()))
    return Bench(name=name, model=model, scheduler=sched, device=device, dtype=dtype,
                 info=info, **inp)


def build_config_bench(config_path: str, device, dtype=None, steps=None, batch=1, seed=42,
                       ckpt_path=None, prompts=None, cfg_options=None, name=None) -> Bench:
    """A bench from an inference config: its text encoder encodes ``prompts`` (default: the
    config's ``prompt`` list, first ``batch``), its codec decodes the final latents."""
    from mmengine.config import Config

    from opensora_duca.pipeline import append_scores, build_from_config

    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"config {config_path!r} does not exist")
    cfg = Config.fromfile(config_path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.cache = None  # policies are attached by the benchmark itself
    pipe = build_from_config(cfg, device=device, dtype=dtype, ckpt_path=ckpt_path)
    if steps is not None:
        pipe.scheduler.num_sampling_steps = steps
    if prompts is None:
        prompts = cfg.get("prompt") or ["a red circle moving left"]
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [prompts[i % len(prompts)] for i in range(batch)]
    prompts = append_scores(list(prompts), pipe.aes, pipe.flow)
    n = len(prompts)
    nf = pipe.defaults["num_frames"]
    hp, wp = pipe.defaults["image_size"]
    latent_size = pipe.latent_size(nf, hp, wp)
    with torch.no_grad():
        enc = pipe.text_encoder.encode(prompts)
    y = enc["y"].to(pipe.device, pipe.dtype)
    mask = enc.get("mask")
    mask = None if mask is None else mask.to(pipe.device)
    y_null = pipe.text_encoder.null(n).to(pipe.device, pipe.dtype)
    z0 = pipe.initial_noise([seed + j for j in range(n)], latent_size)
    fps = pipe.defaults.get("fps", 24)
    add = dict(height=torch.tensor([hp] * n, device=pipe.device, dtype=pipe.dtype),
               width=torch.tensor([wp] * n, device=pipe.device, dtype=pipe.dtype),
               fps=torch.tensor([fps] * n, device=pipe.device, dtype=pipe.dtype))
    vae = pipe.vae

    @torch.no_grad()
    def decode(z):
        return vae.decode(z.to(pipe.device, vae.dtype), num_frames=nf).float().clamp(-1, 1).cpu()

    m = pipe.model
    n_tok = math.prod(m.get_dynamic_size(z0))
    info = dict(config=os.path.relpath(config_path, ROOT) if config_path.startswith(ROOT)
                else config_path, prompts=prompts, latent=[vae.out_channels, *latent_size],
                video=[nf, hp, wp], batch=n, cfg_batch=2 * n, tokens_per_sample=n_tok,
                steps=pipe.scheduler.num_sampling_steps, cfg_scale=pipe.scheduler.cfg_scale,
                seed=seed, model=_as_plain(cfg.model), params=sum(p.numel() for p in
                                                                  m.parameters()))
    return Bench(name=name or os.path.basename(config_path), model=m, scheduler=pipe.scheduler,
                 z0=z0, y=y, y_null=y_null, mask=mask, additional_args=add,
                 sample_kwargs=dict(height=hp, width=wp, num_frames=nf), device=pipe.device,
                 dtype=pipe.dtype, decode=decode, info=info)


def _as_plain(v):
    if hasattr(v, "to_dict"):
        v = v.to_dict()
    if isinstance(v, dict):
        return {k: _as_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_as_plain(x) for x in v]
    return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)


def demo_checkpoint() -> Optional[str]:
    """The checkpoint path the demo config names (None without config or path)."""
    if not os.path.isfile(DEMO_CONFIG):
        return None
    from mmengine.config import Config
    return Config.fromfile(DEMO_CONFIG).model.get("from_pretrained")


def demo_available() -> bool:
    ckpt = demo_checkpoint()
    return ckpt is not None and os.path.isfile(ckpt)


def build_bench(args) -> Bench:
    """The bench of ``--preset`` / ``--config`` with the command line's overrides."""
    from opensora_duca.pipeline import resolve_dtype

    device = resolve_device(args.device)
    if args.config is not None:
        dtype = None if args.dtype is None else resolve_dtype(args.dtype)
        return build_config_bench(args.config, device, dtype, steps=args.steps,
                                  batch=args.batch, seed=args.seed, ckpt_path=args.ckpt_path)
    if args.preset not in PRESETS:
        raise _err("--preset", args.preset, f"one of {list(PRESETS)} (or --config CONFIG)")
    if args.preset == "demo":
        if not os.path.isfile(DEMO_CONFIG):
            raise FileNotFoundError(
                f"--preset demo needs {os.path.relpath(DEMO_CONFIG, ROOT)}, which does not exist "
                f"(yet): the demo model is not shipped in this checkout; use --preset cpu")
        ckpt = args.ckpt_path or demo_checkpoint()
        if ckpt is not None and not os.path.isfile(ckpt):
            raise FileNotFoundError(
                f"--preset demo: the demo checkpoint {ckpt!r} does not exist (yet): train it "
                f"with tools/train.py configs/demo/train.py, or pass --ckpt-path")
        dtype = None if args.dtype is None else resolve_dtype(args.dtype)
        return build_config_bench(DEMO_CONFIG, device, dtype, steps=args.steps, batch=args.batch,
                                  seed=args.seed, ckpt_path=args.ckpt_path, name="demo")
    if args.preset == "cpu":
        preset = CPU_PRESET
        dtype = resolve_dtype(args.dtype or preset["dtype"])
        over = dict(TINY_OVERRIDES) if args.tiny else {}
    else:
        preset = XL_PRESET
        if device.type != "cuda" and not args.allow_cpu:
            raise SystemExit(
                f"--preset {args.preset} is the 480p/51-frame STDiT3-XL/2 shape (~113 TFLOP per "
                f"step): on a CPU one run takes hours. Run it with --device cuda, or pass "
                f"--allow-cpu to run it anyway (with --steps / --latent to shrink it).")
        dtype = resolve_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
        over = {}
    for k in ("hidden", "depth", "latent"):
        if getattr(args, k) is not None:
            over[k] = tuple(getattr(args, k)) if k == "latent" else getattr(args, k)
    return build_random_bench(args.preset + ("-tiny" if args.tiny else ""), preset, device,
                              dtype, steps=args.steps, latent=over.get("latent"),
                              hidden=over.get("hidden"), depth=over.get("depth"),
                              heads=over.get("heads"), batch=args.batch, seed=args.seed,
                              init_seed=args.init_seed, ckpt_path=args.ckpt_path)


# --------------------------------------------------------------------------- measurement
class PeakMemory:
    """Peak memory above the level at :meth:`start` (see the module doc)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = None
        if device.type == "cuda":
            self.method = "cuda max_memory_allocated - memory_allocated at run start"
        elif _can_reset_hwm():
            self.method = "peak RSS (VmHWM after clear_refs=5) - RSS at run start, after malloc_trim"
        self._base = 0

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method:
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _proc_status_kb("VmRSS") * 1024

    def stop(self) -> Optional[int]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self._base)
        if self.method:
            return int(max(0, _proc_status_kb("VmHWM") * 1024 - self._base))
        return None


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _can_reset_hwm() -> bool:
    try:
        _proc_status_kb("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except (OSError, KeyError):
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def timed_run(bench: Bench) -> tuple[torch.Tensor, float, float]:
    """(final latents, wall seconds, process CPU seconds) of one sampling run."""
    c0 = time.process_time()
    if bench.device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(bench.device)
        start.record()
        z = bench.sample()
        end.record()
        torch.cuda.synchronize(bench.device)
        return z, start.elapsed_time(end) / 1e3, time.process_time() - c0
    t0 = time.perf_counter()
    z = bench.sample()
    return z, time.perf_counter() - t0, time.process_time() - c0


def _unit_range(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    lo, hi = float(ref.min()), float(ref.max())
    return (x.double() - lo) / max(hi - lo, 1e-12)


def fidelity(z: torch.Tensor, z_ref: torch.Tensor) -> dict:
    """PSNR / SSIM of latents [B, C, T, H, W] mapped to [0, 1] by the reference's range."""
    from opensora_duca.eval.fidelity import psnr, ssim

    a, b = _unit_range(z.cpu(), z_ref.cpu()), _unit_range(z_ref.cpu(), z_ref.cpu())
    out = {"psnr": psnr(a, b, layout="BCTHW"), "ssim": None,
           "rel_l2": float((z.double().cpu() - z_ref.double().cpu()).norm()
                           / z_ref.double().cpu().norm().clamp_min(1e-30))}
    if min(z.shape[-2:]) >= 11:
        out["ssim"] = ssim(a, b, layout="BCTHW")
    return out


def frame_fidelity(v: torch.Tensor, v_ref: torch.Tensor) -> dict:
    """PSNR / SSIM of decoded frames [B, 3, T, H, W] in [-1, 1] (compared in [0, 1])."""
    from opensora_duca.eval.fidelity import psnr, ssim

    a, b = (v.double() + 1) / 2, (v_ref.double() + 1) / 2
    out = {"psnr_frames": psnr(a, b, layout="BCTHW"), "ssim_frames": None}
    if min(v.shape[-2:]) >= 11:
        out["ssim_frames"] = ssim(a, b, layout="BCTHW")
    return out


def parse_policies(text: str) -> List[str]:
    import opensora_duca.cache  # noqa: F401  (registers the policies)
    from opensora_duca.registry import CACHES as REG, registered

    names = [p.strip() for p in text.split(",") if p.strip()]
    known = registered(REG)
    bad = [p for p in names if p not in known]
    if not names or bad:
        raise _err("--policies", text, f"a comma-separated list of registered policies {known}")
    if len(set(names)) != len(names):
        raise _err("--policies", text, "each policy at most once")
    if "none" not in names:
        names = ["none"] + names  # the reference of speedup and fidelity
    else:
        names = ["none"] + [n for n in names if n != "none"]
    return names


def run_benchmark(bench: Bench, policies: List[str], repeat: int, warmup: int,
                  log=print) -> dict:
    """Interleaved rounds over ``policies``; returns the JSON-ready report."""
    from opensora_duca.cache import apply_cache, remove_cache

    if repeat < 1:
        raise _err("--repeat", repeat, "an int >= 1")
    if warmup < 0:
        raise _err("--warmup", warmup, "an int >= 0")
    n_steps = bench.num_steps
    if bench.device.type == "cpu" and warmup == 0:  # one untimed model call
        with torch.no_grad():
            bench.model(torch.cat([bench.z0, bench.z0]), bench.timesteps()[:1].expand(
                2 * bench.z0.shape[0]), torch.cat([bench.y, bench.y_null]),
                mask=None if bench.mask is None else torch.cat([bench.mask, bench.mask]),
                **bench.additional_args)
    mem = PeakMemory(bench.device)
    times = {p: [] for p in policies}
    cpu_times = {p: [] for p in policies}
    peaks = {p: [] for p in policies}
    stats, finals = {}, {}
    for r in range(warmup + repeat):
        timed = r >= warmup
        for p in policies:
            mgr = apply_cache(bench.model, dict(type=p))
            try:
                with mgr.session(n_steps):
                    mem.start()
                    z, dt, dc = timed_run(bench)
                    peak = mem.stop()
                stats[p] = mgr.stats()
            finally:
                remove_cache(bench.model)
            if timed:
                times[p].append(dt)
                cpu_times[p].append(dc)
                peaks[p].append(peak)
                finals[p] = z.float().cpu()
            log(f"[{'run' if timed else 'warm-up'} {r - warmup + 1 if timed else r + 1}] "
                f"{p:<10s} {dt:8.3f} s wall, {dc:8.3f} s CPU")
    ref = finals["none"]
    ref_frames = bench.decode(ref) if bench.decode is not None else None
    med_none = statistics.median(times["none"])
    cpu_none = statistics.median(cpu_times["none"])
    results = []
    for p in policies:
        med = statistics.median(times[p])
        st = stats[p]
        fid = fidelity(finals[p], ref)
        med_cpu = statistics.median(cpu_times[p])
        row = dict(policy=p, median_s=med, times_s=times[p], speedup=med_none / med,
                   min_s=min(times[p]), speedup_min=min(times["none"]) / min(times[p]),
                   median_cpu_s=med_cpu, cpu_times_s=cpu_times[p],
                   speedup_cpu=cpu_none / med_cpu if med_cpu > 0 else None,
                   flops_ratio=float(st["flops_ratio"]),
                   peak_cache_bytes=int(st["peak_stored_bytes"]),
                   peak_mem_bytes=None if any(v is None for v in peaks[p]) else max(peaks[p]),
                   bookkeeping_s=float(st["bookkeeping_s"]),
                   bookkeeping_frac=float(st["bookkeeping_s"]) / med if med > 0 else None,
                   psnr=fid["psnr"], ssim=fid["ssim"], rel_l2=fid["rel_l2"],
                   steps_by_kind=st["steps_by_kind"], policy_config=st["policy"])
        if ref_frames is not None:
            row.update(frame_fidelity(bench.decode(finals[p]), ref_frames))
        results.append(row)
    return {"device": _device_name(bench.device), "preset": bench.name, "torch": torch.__version__,
            "dtype": str(bench.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "repeat": repeat, "warmup": warmup, "num_steps": n_steps,
            "peak_mem_method": mem.method, "setup": bench.info, "results": results}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------- output
def _fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def markdown_table(report: dict) -> str:
    frames = any("psnr_frames" in r for r in report["results"])
    head = ["policy", "median s", "speedup", "min s", "speedup (min)", "CPU-time speedup",
            "FLOPs ratio", "PSNR lat",
            "SSIM lat"]
    if frames:
        head += ["PSNR frames", "SSIM frames"]
    head += ["peak cache MiB", "peak mem MiB", "bookkeeping ms (%)", "steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        kinds = ", ".join(f"{v} {k}" for k, v in r["steps_by_kind"].items())
        cells = [r["policy"], f"{r['median_s']:.3f}", f"{r['speedup']:.2f}x",
                 f"{r['min_s']:.3f}", f"{r['speedup_min']:.2f}x",
                 _fmt(r.get("speedup_cpu"), ".2f") + ("x" if r.get("speedup_cpu") else ""),
                 f"{r['flops_ratio']:.2f}x", _fmt(r["psnr"], ".2f"), _fmt(r["ssim"], ".4f")]
        if frames:
            cells += [_fmt(r.get("psnr_frames"), ".2f"), _fmt(r.get("ssim_frames"), ".4f")]
        pm = r["peak_mem_bytes"]
        cells += [f"{r['peak_cache_bytes'] / 2**20:.1f}", _fmt(None if pm is None else pm / 2**20,
                                                                ".1f"),
                  f"{r['bookkeeping_s'] * 1e3:.1f} ({100 * (r['bookkeeping_frac'] or 0):.1f}%)",
                  kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    others = [r for r in res if r["policy"] != "none"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "speedup", "measured wall-time speedup vs none"),
                           (axes[1], "flops_ratio", "analytic FLOPs ratio vs none")):
        for r in others:
            ax.scatter(r[key], r["psnr"], s=50)
            ax.annotate(r["policy"], (r[key], r["psnr"]), textcoords="offset points",
                        xytext=(5, 4))
        ax.axvline(1.0, color="grey", ls=":", lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR of final latents vs none (dB)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['preset']} on {report['device']}: speed vs fidelity "
                 f"(none = reference, x = 1)", fontsize=9)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "." + os.path.basename(path) + ".partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help=f"one of {list(PRESETS)}")
    p.add_argument("--config", default=None, help="benchmark an inference config instead")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated policy names")
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
    p.add_argument("--allow-cpu", action="store_true", help="let the 480p preset run on a CPU")
    p.add_argument("--quiet", action="store_true", help="no per-run lines")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise _err("--threads", args.threads, "an int >= 1")
        torch.set_num_threads(args.threads)
    if args.batch < 1:
        raise _err("--batch", args.batch, "an int >= 1")
    if args.steps is not None and args.steps < 1:
        raise _err("--steps", args.steps, "an int >= 1")
    policies = parse_policies(args.policies)
    bench = build_bench(args)
    warmup = args.warmup if args.warmup is not None else (1 if bench.device.type == "cuda" else 0)
    log = (lambda *a, **k: None) if args.quiet else (lambda s: print(s, flush=True))
    info = bench.info
    print(f"benchmark {bench.name}: {info.get('tokens_per_sample')} tokens/sample, CFG batch "
          f"{info.get('cfg_batch')}, {bench.num_steps} steps, {bench.dtype}, "
          f"{_device_name(bench.device)}", flush=True)
    report = run_benchmark(bench, policies, args.repeat, warmup, log=log)
    print(markdown_table(report), flush=True)
    if args.json:
        from opensora_duca.eval.fidelity import write_json_atomic
        write_json_atomic(report, args.json)
        print(f"[json] {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"[plot] {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
