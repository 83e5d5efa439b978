"""Train an STDiT3 with rectified flow (Open-Sora style) — used for the embedded demo model.

    python tools/train.py configs/demo/train.py                 # resumes from outputs/ if any
    python tools/train.py CONFIG --resume path/to/last.pt       # resume from a given checkpoint
    python tools/train.py CONFIG --no-resume                    # ignore an existing checkpoint
    torchrun --nproc_per_node 2 tools/train.py CONFIG           # data parallel (DDP, gloo)

Training (per step): clips from the dataset -> ``vae.encode`` -> x0; t = sigmoid(N(0, 1)) * 1000
(logit-normal, from the config's ``scheduler``); x_t = (1 - t/1000) x0 + t/1000 noise; the
model's FIRST ``in_channels`` output channels regress v = x0 - noise (MSE). Captions go through
the trainable text encoder; with probability ``caption_dropout`` a sample's caption embedding is
replaced by the model's null caption ``model.y_embedder.y_embedding`` (mask unchanged, as
Open-Sora does) so classifier-free guidance works. AdamW, warmup + cosine/constant LR, gradient
clipping, EMA of model + text encoder weights.

Determinism and resume: the clips of step s are a pure function of (seed, s) (epoch-wise
permutations of the dataset, global batch = batch_size x world size, rank r takes its slice);
noise, timesteps and caption dropout come from a per-rank torch.Generator whose state is
checkpointed. A checkpoint (``{outputs}/checkpoints/last.pt``, written to a temporary file and
renamed) holds weights, EMA, optimizer, step, loss history and every RNG state, so a resumed
run continues bit-identically. SIGTERM / SIGINT make the run finish its current step, write a
checkpoint and exit (code 143 / 130): an interrupted run loses no progress. A hard kill loses
at most ``ckpt_every`` steps, which the resumed run recomputes identically.

``time_limit`` (seconds of training wall time, resumed time included) ends a run early, after
the step that crosses it, exactly as if ``steps`` had been reached (checkpoint, export); the
exported metadata records the steps actually done, and a rerun with ``steps`` set to that
number and no time limit reproduces the weights bit for bit.

At the end the EMA weights are exported as ONE safetensors file (``export``): model keys
prefixed ``model.``, text-encoder keys prefixed ``text_encoder.``, with metadata (config,
steps, final loss, seed, wall time).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import signal
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.checkpoint import PARAMETER_FREE_OPTIONS
from ..registry import DATASETS, MODELS, SCHEDULERS, TEXT_ENCODERS, VAES, build_module
from ..utils.atomic import atomic_write, save_torch, write_json
from ..utils.dtype import SHORT_DTYPES
from ..utils.host_memory import keep_freed_host_memory

REQUIRED_KEYS = ("model", "text_encoder", "vae", "dataset")
DEFAULTS = dict(
    seed=42, batch_size=16, steps=None, epochs=None, lr=1e-3, weight_decay=0.0,
    betas=(0.9, 0.999), warmup_steps=50, lr_schedule="constant", min_lr_ratio=0.1,
    grad_clip=1.0, ema_decay=0.999, caption_dropout=0.1, ckpt_every=100, log_every=10,
    num_threads=None, device="cpu", time_limit=None, outputs="outputs/train", export=None,
    export_dtype="fp32",
    scheduler=dict(type="rflow", sample_method="logit-normal"), fps=None,
    temporal_init="zero", caption_init="default",
)
TEMPORAL_INITS = ("zero", "xavier")
CAPTION_INITS = ("default", "xavier")
LR_SCHEDULES = ("constant", "cosine")


# ---------------------------------------------------------------------------- config
def load_config(path_or_dict: Any, overrides: dict | None = None) -> dict:
    """Read an mmengine config file (or take a dict), apply overrides, fill defaults, check."""
    if isinstance(path_or_dict, dict):
        cfg = dict(path_or_dict)
    else:
        from mmengine.config import Config
        if not os.path.isfile(path_or_dict):
            raise FileNotFoundError(f"config {path_or_dict!r} does not exist")
        cfg = Config.fromfile(path_or_dict).to_dict()
    cfg.update(overrides or {})
    for k, v in DEFAULTS.items():
        cfg.setdefault(k, v)
    for k in REQUIRED_KEYS:
        if not isinstance(cfg.get(k), dict) or "type" not in cfg[k]:
            raise KeyError(f"config key {k!r}={cfg.get(k)!r} is not accepted; accepted: a "
                           "dict(type=...) entry")
    if (cfg["steps"] is None) == (cfg["epochs"] is None):
        raise ValueError(f"config keys steps={cfg['steps']!r} and epochs={cfg['epochs']!r}: "
                         "set exactly one (a positive int steps, or a positive number epochs)")
    for k in ("batch_size", "ckpt_every", "log_every") + (("steps",) if cfg["steps"] else ()):
        v = cfg[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config key {k}={v!r} is not accepted; accepted: an int >= 1")
    for k, lo, hi in (("caption_dropout", 0, 1), ("ema_decay", 0, 1), ("min_lr_ratio", 0, 1)):
        v = cfg[k]
        if not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ValueError(f"config key {k}={v!r} is not accepted; accepted: a number in "
                             f"[{lo}, {hi}]")
    if cfg["time_limit"] is not None and (not isinstance(cfg["time_limit"], (int, float))
                                          or cfg["time_limit"] <= 0):
        raise ValueError(f"config key time_limit={cfg['time_limit']!r} is not accepted; "
                         "accepted: None or a number of seconds > 0")
    if not isinstance(cfg["lr"], (int, float)) or cfg["lr"] <= 0:
        raise ValueError(f"config key lr={cfg['lr']!r} is not accepted; accepted: a number > 0")
    for k, accepted in (("lr_schedule", LR_SCHEDULES), ("temporal_init", TEMPORAL_INITS),
                        ("caption_init", CAPTION_INITS), ("export_dtype", SHORT_DTYPES)):
        if cfg[k] not in accepted:
            raise ValueError(f"config key {k}={cfg[k]!r} is not accepted; accepted: "
                             f"{list(accepted)}")
    return cfg


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# --------------------------------------------------------------------------- modules
class Trainee(nn.Module):
    """Model + trainable text encoder as one module (one DDP wrapper, one EMA, one export)."""

    def __init__(self, model: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.model, self.text_encoder = model, text_encoder

    def forward(self, x_t, t, ids, mask, drop, **model_kwargs):
        y = self.text_encoder.embed(ids, mask)  # [B, 1, L, C]
        null = self.model.y_embedder.y_embedding.to(y.dtype)  # [L, C]
        y = torch.where(drop[:, None, None, None], null[None, None].expand_as(y), y)
        return self.model(x_t, t, y, mask=mask, **model_kwargs)


def init_temporal_blocks(model: nn.Module) -> None:
    """Xavier-uniform init of the temporal blocks' output projections (attn.proj,
    cross_attn.proj, mlp.fc2), which Open-Sora zero-initialises because it starts from an
    image model; from scratch, zero temporal blocks learn motion very slowly."""
    for blk in getattr(model, "temporal_blocks", []):
        for lin in (blk.attn.proj, blk.cross_attn.proj, blk.mlp.fc2):
            nn.init.xavier_uniform_(lin.weight)


def init_caption_projection(model: nn.Module) -> None:
    """Xavier-uniform init of the caption projection (y_embedder.y_proj fc1/fc2), which
    Open-Sora draws with std 0.02 for 4096-channel T5 features; on a 64-channel word encoder
    that scale lets the projection shrink the rarely useful words before they are learned."""
    proj = model.y_embedder.y_proj
    for lin in (proj.fc1, proj.fc2):
        nn.init.xavier_uniform_(lin.weight)


def build_trainee(cfg: dict) -> tuple[Trainee, Any, Any, Any]:
    te = build_module(cfg["text_encoder"], TEXT_ENCODERS)
    if not isinstance(te, nn.Module) or not hasattr(te, "embed") or not hasattr(te, "tokenize"):
        raise ValueError(f"config key text_encoder={cfg['text_encoder']!r} is not accepted for "
                         "training; accepted: a trainable encoder with tokenize()/embed() "
                         "(e.g. DemoTextEncoder)")
    vae = build_module(cfg["vae"], VAES)
    model = build_module(cfg["model"], MODELS, caption_channels=te.output_dim,
                         model_max_length=te.model_max_length, in_channels=vae.out_channels)
    if not cfg["model"].get("from_pretrained"):  # from-scratch re-initialisations
        if cfg.get("temporal_init", "zero") == "xavier":
            init_temporal_blocks(model)
        if cfg.get("caption_init", "default") == "xavier":
            init_caption_projection(model)
    scheduler = build_module(cfg["scheduler"], SCHEDULERS)
    dataset = build_module(cfg["dataset"], DATASETS)
    return Trainee(model, te), vae, scheduler, dataset


# ------------------------------------------------------------------------------ data
class StepSampler:
    """Indices of the dataset for step s and rank r: a pure function of (seed, s, r)."""

    def __init__(self, length: int, batch_size: int, world: int, seed: int):
        self.n, self.b, self.world, self.seed = length, batch_size, world, seed
        self._epoch, self._perm = None, None

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def indices(self, step: int, rank: int) -> list[int]:
        start = (step * self.world + rank) * self.b
        out = []
        for pos in range(start, start + self.b):
            out.append(int(self._perm_of(pos // self.n)[pos % self.n]))
        return out


def get_batch(dataset, indices, te) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in indices]
    video = torch.stack([it["video"] for it in items])
    ids, mask = te.tokenize([it["text"] for it in items])
    return video, ids, mask


# ------------------------------------------------------------------------ utilities
def lr_at(cfg: dict, step: int, total: int) -> float:
    warm = cfg["warmup_steps"]
    if warm and step < warm:
        return cfg["lr"] * (step + 1) / warm
    if cfg["lr_schedule"] == "cosine":
        frac = (step - warm) / max(1, total - warm)
        r = cfg["min_lr_ratio"]
        return cfg["lr"] * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
    return cfg["lr"]


def ema_decay_at(decay: float, step: int) -> float:
    """Warm-started EMA: min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: dict, module: nn.Module, decay: float) -> None:
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            ema[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)
        else:
            ema[k].copy_(v)


def global_rng_states() -> dict:
    """The torch, numpy and python RNG states as tensors, lists and numbers only, so that a
    checkpoint holding them loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, py_gauss = random.getstate()
    return dict(torch=torch.get_rng_state(),
                numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), gauss=float(gauss)),
                python=dict(version=version, words=list(words), gauss=py_gauss))


def set_global_rng_states(rng: dict) -> None:
    """Inverse of :func:`global_rng_states`."""
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["words"]), p["gauss"]))


def load_training_checkpoint(path: str, device: torch.device) -> dict:
    """``torch.load(path, weights_only=True)``: a checkpoint whose pickle names anything but
    tensors, containers and numbers (code to run, or the numpy objects of older checkpoints) is
    refused with a one-line ValueError before any of it runs."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError) as err:  # truncated, or no torch archive at all
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path!r} cannot be read ({type(err).__name__}: {first}; "
                         f"truncated or not a checkpoint); accepted: a checkpoint written by "
                         f"this tools/train.py -- use --no-resume or another outputs folder to "
                         f"start a new run") from None
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines()
                       if "GLOBAL" in line or "Unsupported" in line), type(err).__name__)
        raise ValueError(f"checkpoint {path!r} is refused: it holds more than tensors, "
                         f"containers and numbers ({detail}); accepted: a checkpoint written by "
                         "this tools/train.py — use --no-resume or another outputs folder to "
                         "start a new run") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks {missing}; accepted: a checkpoint written "
                         f"by this tools/train.py (keys {list(CHECKPOINT_KEYS)})")
    return ck


#: what a training checkpoint holds
CHECKPOINT_KEYS = ("step", "trainee", "ema", "optimizer", "history", "world_size", "rng")


class CheckpointWriteError(RuntimeError):
    """Writing the training checkpoint failed (disk full, permissions); the previous one is
    intact (atomic write)."""


def _load_states(resume: str, trainee: nn.Module, opt, ck: dict) -> None:
    """The checkpoint's model and optimizer states, refused in one line when they do not fit
    (another model's shapes, another optimizer)."""
    try:
        trainee.load_state_dict(ck["trainee"])
        opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        detail = " ".join(lines)[:400] or type(err).__name__
        raise ValueError(f"checkpoint {resume!r} does not fit this model / optimizer "
                         f"({detail}); accepted: a checkpoint of the same training config -- "
                         f"use --no-resume or another outputs folder to start a new run") from None


def export_safetensors(ema: dict, path: str, dtype: torch.dtype, metadata: dict) -> None:
    from safetensors.torch import save_file
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone()
               for k, v in ema.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp,
                                             metadata={k: str(v) for k, v in metadata.items()}))


class _StopFlag:
    def __init__(self):
        self.signum = None

    def __call__(self, signum, _frame):
        self.signum = signum


def _dist_info() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj: Any, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------- train
def train(cfg: dict, *, resume: str | bool | None = None, stop_after: int | None = None,
          progress: bool = True) -> dict:
    """Run (or continue) training. ``resume``: a checkpoint path, True/None (= automatic: the
    output folder's last.pt if present) or False (start over). ``stop_after``: stop (with a
    checkpoint, like SIGTERM) after this many steps of this call. Returns a summary dict."""
    rank, world = _dist_info()
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    seed = int(cfg["seed"])
    torch.manual_seed(seed)  # identical initial weights on every rank
    trainee, vae, scheduler, dataset = build_trainee(cfg)
    te, model = trainee.text_encoder, trainee.model
    device = torch.device(cfg["device"])
    trainee.to(device)
    vae.to(device)
    steps = cfg["steps"] or math.ceil(cfg["epochs"] * len(dataset) /
                                      (cfg["batch_size"] * world))
    planned_steps = steps
    sampler = StepSampler(len(dataset), cfg["batch_size"], world, seed)
    opt = torch.optim.AdamW(trainee.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]),
                            weight_decay=cfg["weight_decay"])
    ema = {k: (v.detach().float().clone() if v.is_floating_point() else v.clone())
           for k, v in trainee.state_dict().items()}
    gen = torch.Generator().manual_seed(seed * 7919 + rank)  # on CPU: same stream on any device
    out_dir = cfg["outputs"]
    ckpt_path = os.path.join(out_dir, "checkpoints", "last.pt")
    step, history, wall = 0, [], 0.0

    if resume is None or resume is True:
        resume = ckpt_path if os.path.isfile(ckpt_path) else None
    elif resume is False:
        resume = None
    if resume:
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint")
        ck = load_training_checkpoint(resume, device)
        check_resume_config(ck.get("config", {}), cfg, resume)
        if ck["world_size"] != world:
            raise ValueError(f"checkpoint {resume!r} was written with world_size="
                             f"{ck['world_size']}; this run has world_size={world}; accepted: "
                             "the same number of ranks (data shards and RNG streams are per rank)")
        _load_states(resume, trainee, opt, ck)
        ema = {k: v.to(device) for k, v in ck["ema"].items()}
        gen.set_state(ck["rng"]["generators"][rank])
        set_global_rng_states(ck["rng"])
        step, history, wall = ck["step"], ck["history"], ck.get("wall_time", 0.0)
        if rank == 0:
            print(f"resumed from {resume} at step {step}", flush=True)

    net: nn.Module = trainee
    if world > 1:
        net = nn.parallel.DistributedDataParallel(trainee)
    trainee.train()

    def checkpoint():
        gens = _gather(gen.get_state(), world)
        if rank == 0:
            try:
                save_torch(ckpt_path, dict(
                    step=step, trainee=trainee.state_dict(), ema=ema, optimizer=opt.state_dict(),
                    history=history, world_size=world, wall_time=wall + (time.time() - t_start),
                    config=_jsonable(cfg), rng=dict(global_rng_states(), generators=gens)))
            except OSError as err:
                raise CheckpointWriteError(
                    f"could not write the checkpoint {ckpt_path} at step {step} "
                    f"({type(err).__name__}: {err}); the previous checkpoint is intact") from None
        if world > 1:
            torch.distributed.barrier()

    stop = _StopFlag()
    old_handlers = {}
    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            old_handlers[s] = signal.signal(s, stop)
        except ValueError:  # not the main thread
            pass
    log_path = os.path.join(out_dir, "log.jsonl")
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if not resume and os.path.exists(log_path):
            os.remove(log_path)  # a fresh run starts a fresh log
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=step, desc="train", dynamic_ncols=True)
    t_start, done_here, last_log = time.time(), 0, None
    fps_kw = {} if cfg["fps"] is None else dict(fps=torch.tensor([float(cfg["fps"])],
                                                                 device=device))
    try:
        while step < steps:
            lr = lr_at(cfg, step, planned_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            video, ids, mask = get_batch(dataset, sampler.indices(step, rank), te)
            ids, mask = ids.to(device), mask.to(device)
            with torch.no_grad():
                x0 = vae.encode(video.to(device)).float()
            b = x0.shape[0]
            t = scheduler.sample_t(b, generator=gen).to(device)  # sigmoid(N(0,1)) * 1000
            noise = torch.randn(x0.shape, generator=gen).to(device)
            drop = (torch.rand(b, generator=gen) < cfg["caption_dropout"]).to(device)
            # MSE of the first in_channels outputs at x_t = (1 - t/1000) x0 + t/1000 noise
            loss = scheduler.training_loss(net, x0, dict(ids=ids, mask=mask, drop=drop, **fps_kw),
                                           noise=noise, t=t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(trainee.parameters(), cfg["grad_clip"])
            opt.step()
            update_ema(ema, trainee, ema_decay_at(cfg["ema_decay"], step))
            loss_v = loss.detach().cpu()
            if world > 1:
                torch.distributed.all_reduce(loss_v)
                loss_v /= world
            history.append(float(loss_v))
            step += 1
            done_here += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(history[-20:]):.4f}", lr=f"{lr:.2e}")
            if rank == 0 and (step % cfg["log_every"] == 0 or step == steps):
                last_log = dict(step=step, loss=float(np.mean(history[-cfg["log_every"]:])),
                                lr=lr, time=round(wall + time.time() - t_start, 1))
                with open(log_path, "a") as f:
                    f.write(json.dumps(last_log) + "\n")
            interrupted = stop.signum is not None
            if world > 1:  # all ranks stop together
                flag = torch.tensor([1 if interrupted else 0])
                torch.distributed.all_reduce(flag)
                interrupted = bool(flag.item())
            if stop_after is not None and done_here >= stop_after:
                interrupted = True
            out_of_time = cfg["time_limit"] is not None and \
                wall + time.time() - t_start >= cfg["time_limit"]
            if world > 1 and cfg["time_limit"] is not None:  # rank 0's clock decides
                flag = torch.tensor([1 if out_of_time else 0])
                torch.distributed.broadcast(flag, 0)
                out_of_time = bool(flag.item())
            if out_of_time and step < steps:
                if rank == 0:
                    print(f"time_limit={cfg['time_limit']}s reached at step {step}: finishing",
                          flush=True)
                steps = step  # finish here: checkpoint, export
            if step % cfg["ckpt_every"] == 0 or step == steps or interrupted:
                checkpoint()
            if interrupted and step < steps:
                if bar is not None:
                    bar.close()
                if rank == 0:
                    print(f"interrupted: checkpoint at step {step} written to {ckpt_path}",
                          flush=True)
                if stop.signum is not None:
                    raise SystemExit(128 + stop.signum)
                return dict(step=step, steps=steps, finished=False, ckpt=ckpt_path)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()

    wall_total = wall + time.time() - t_start
    final_loss = float(np.mean(history[-min(len(history), 100):])) if history else float("nan")
    summary = dict(step=step, steps=steps, finished=True, ckpt=ckpt_path, final_loss=final_loss,
                   wall_time=wall_total, seed=seed, time_limited=steps != planned_steps)
    if rank == 0 and cfg.get("export"):
        dtype = SHORT_DTYPES[cfg["export_dtype"]]
        meta = dict(format="opensora_duca demo bundle: model.* = STDiT3, text_encoder.* = "
                           "DemoTextEncoder (EMA weights)",
                    config=json.dumps(_jsonable(export_config(cfg, model, te))), steps=step,
                    final_loss=f"{final_loss:.6f}", seed=seed, wall_time_s=f"{wall_total:.0f}",
                    world_size=world, ema_decay=cfg["ema_decay"])
        export_safetensors({k: v.cpu() for k, v in ema.items()}, cfg["export"], dtype, meta)
        summary["export"] = cfg["export"]
        print(f"exported EMA weights to {cfg['export']} "
              f"({os.path.getsize(cfg['export']) / 2**20:.1f} MiB)", flush=True)
    if rank == 0:
        write_json(os.path.join(out_dir, "summary.json"), summary)
    return summary


def export_config(cfg: dict, model: nn.Module, te: nn.Module) -> dict:
    """The config entries a user needs to rebuild and describe the exported model."""
    keys = ("model", "text_encoder", "vae", "dataset", "scheduler", "seed", "batch_size", "steps",
            "epochs", "lr", "lr_schedule", "warmup_steps", "weight_decay", "grad_clip",
            "ema_decay", "caption_dropout", "fps", "temporal_init", "caption_init")
    out = {k: cfg[k] for k in keys if k in cfg}
    out["model"] = dict(out["model"], in_channels=model.in_channels,
                        caption_channels=te.output_dim, model_max_length=te.model_max_length)
    for key in PARAMETER_FREE_OPTIONS:  # no weights show them: recorded for the loader's check
        if hasattr(model, key):
            out["model"][key] = getattr(model, key) is not None
    return out


# keys that may change between a run and its resumption (everything else must match)
RESUME_MAY_CHANGE = ("steps", "epochs", "time_limit", "ckpt_every", "log_every", "outputs",
                     "export", "export_dtype", "num_threads", "device")


def check_resume_config(saved: dict, cfg: dict, path: str) -> None:
    """Refuse to resume a checkpoint written with different training settings."""
    now = _jsonable(cfg)
    diff = sorted(k for k in set(saved) | set(now)
                  if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k))
    if diff:
        raise ValueError(
            f"checkpoint {path!r} was written with other settings for config keys {diff} "
            f"(saved: {[saved.get(k) for k in diff]}, now: {[now.get(k) for k in diff]}); "
            f"accepted: the same values (only {list(RESUME_MAY_CHANGE)} may change) — use "
            "--no-resume or another outputs folder to start a new run")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def main(argv=None) -> dict:
    keep_freed_host_memory()  # CPU runs: no page faults per step
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="mmengine config file (e.g. configs/demo/train.py)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", help="checkpoint to resume from (default: the output folder's "
                                    "checkpoints/last.pt when it exists)")
    g.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint "
                                                            "exists (it will be overwritten)")
    p.add_argument("--outputs", help="override the config's outputs folder")
    p.add_argument("--steps", type=int, help="override the config's steps")
    p.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after N steps")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--cfg-options", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override top-level config keys (values parsed as JSON when possible)")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.cfg_options:
        if "=" not in item:
            raise SystemExit(f"--cfg-options {item!r} is not accepted; accepted: KEY=VALUE")
        k, v = item.split("=", 1)
        overrides[k] = parse_value(v)
    if args.outputs:
        overrides["outputs"] = args.outputs
    if args.steps:
        overrides.update(steps=args.steps, epochs=None)
    resume = False if args.no_resume else (args.resume or None)
    try:
        summary = train(load_config(args.config, overrides), resume=resume,
                        stop_after=args.stop_after, progress=not args.no_progress)
    except (KeyError, ValueError, FileNotFoundError) as err:  # settings / checkpoint: one line
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        msg = str(msg).strip().splitlines()[0] if str(msg).strip() else repr(err)
        print(f"train.py: error: {type(err).__name__}: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except CheckpointWriteError as err:  # a disk problem, not the settings
        print(f"train.py: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
