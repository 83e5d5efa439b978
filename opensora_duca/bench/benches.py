"""The benches of the benchmark and the error analysis: one model with fixed inputs (weights,
initial noise, captions) that every cache policy runs on.

Presets: ``cpu`` (a random-weight STDiT3-S/2-class model), ``demo`` (the demo model through
``configs/demo/inference.py`` of a source checkout), ``opensora-480p-51f`` (STDiT3-XL/2 at the
480p 51-frame latent shape), ``opensora13-720p-113f`` (Open-Sora 1.3's STDiT3-XL/2 at its default
720p 113-frame shape), or any inference config (its text encoder and codec).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..utils.config import load_config, plain
from ..utils.dtype import resolve_dtype

#: the source checkout holding configs/ (the tools run from one)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo", "inference.py")
PRESETS = ("cpu", "demo", "opensora-480p-51f", "opensora13-720p-113f")

CPU_PRESET = dict(model=dict(type="STDiT3-S/2", hidden_size=256, depth=4, num_heads=8,
                             caption_channels=64, model_max_length=16),
                  latent=(4, 5, 32, 32), video=(17, 256, 256), caption_len=16, steps=30,
                  cfg_scale=7.0, dtype="fp32")
TINY_OVERRIDES = dict(hidden=64, depth=2, heads=4, latent=(4, 3, 8, 8))
XL_PRESET = dict(model=dict(type="STDiT3-XL/2", caption_channels=4096, model_max_length=300,
                            enable_flash_attn=True),
                 latent=(4, 15, 60, 106), video=(51, 480, 854), caption_len=300, steps=30,
                 cfg_scale=7.0, dtype="bf16")
# Open-Sora 1.3 (configs/opensora-v1-3/inference/sample.py): 720p 9:16, 113 frames -> the 1.3
# VAE's latent [16, 35, 90, 160]; window attention (8, 8, -1), 3-D rope, 1.3 sampler options
XL13_PRESET = dict(model=dict(type="STDiT3-XL/2", caption_channels=4096, model_max_length=300,
                              enable_flash_attn=True, cond_embedders=True,
                              kernel_size=(8, 8, -1), use_spatial_rope=True),
                   latent=(16, 35, 90, 160), video=(113, 720, 1280), caption_len=300, steps=30,
                   cfg_scale=7.5, dtype="bf16",
                   scheduler=dict(transform_version="1.3", use_oscillation_guidance=True,
                                  use_flaw_fix=True))
LARGE_PRESETS = {"opensora-480p-51f": (XL_PRESET, "480p/51-frame", 113),
                 "opensora13-720p-113f": (XL13_PRESET, "720p/113-frame", 740)}


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


def option_error(key: str, value: Any, accepted: str) -> ValueError:
    """The one-line error of a bad command-line value."""
    return ValueError(f"{key}={value!r} is not accepted; accepted: {accepted}")


def resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise option_error("--device", device, "cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise option_error("--device", device, "cpu (CUDA is not available here)")
    if dev.type not in ("cpu", "cuda"):
        raise option_error("--device", device, "cpu, cuda or cuda:N")
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
    from ..registry import MODELS, build_module
    from ..schedulers.rflow import RFlow

    mcfg = dict(preset["model"])
    if hidden is not None:
        mcfg["hidden_size"] = hidden
    if depth is not None:
        mcfg["depth"] = depth
    if heads is not None:
        mcfg["num_heads"] = heads
    latent = tuple(latent or preset["latent"])
    if len(latent) != 4 or any(not isinstance(v, int) or v < 1 for v in latent):
        raise option_error("--latent", latent, "four positive ints C T H W")
    if ckpt_path is not None:
        mcfg["from_pretrained"] = ckpt_path
    torch.manual_seed(int(init_seed))
    model = build_module(mcfg, MODELS, input_size=latent[1:], in_channels=latent[0])
    model = model.to(device, dtype).eval()
    steps = preset["steps"] if steps is None else steps
    sched = RFlow(num_sampling_steps=steps, cfg_scale=preset["cfg_scale"],
                  use_timestep_transform=True, **preset.get("scheduler", {}))
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
    from ..pipeline import append_scores, build_from_config

    cfg = load_config(config_path, cfg_options)
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
    v = plain(v)
    if isinstance(v, dict):
        return {k: _as_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_as_plain(x) for x in v]
    return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)


def demo_checkpoint() -> Optional[str]:
    """The checkpoint path the demo config names (None without config or path)."""
    if not os.path.isfile(DEMO_CONFIG):
        return None
    return load_config(DEMO_CONFIG).model.get("from_pretrained")


def demo_available() -> bool:
    ckpt = demo_checkpoint()
    return ckpt is not None and os.path.isfile(ckpt)


def build_bench(args) -> Bench:
    """The bench of ``--preset`` / ``--config`` with the command line's overrides."""
    device = resolve_device(args.device)
    if args.config is not None:
        dtype = None if args.dtype is None else resolve_dtype(args.dtype)
        return build_config_bench(args.config, device, dtype, steps=args.steps,
                                  batch=args.batch, seed=args.seed, ckpt_path=args.ckpt_path)
    if args.preset not in PRESETS:
        raise option_error("--preset", args.preset, f"one of {list(PRESETS)} (or --config CONFIG)")
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
        preset, shape, tflop = LARGE_PRESETS[args.preset]
        if device.type != "cuda" and not args.allow_cpu:
            raise SystemExit(
                f"--preset {args.preset} is the {shape} STDiT3-XL/2 shape (~{tflop} TFLOP per "
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
