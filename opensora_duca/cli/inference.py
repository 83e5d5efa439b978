"""Text-to-video inference with Open-Sora-1.2-style configs (optionally with feature caching).

Usage::

    python tools/inference.py CONFIG [--prompt P [P ...]] [--prompt-path FILE]
        [--num-frames N] [--resolution 480p] [--aspect-ratio 9:16] [--image-size H W]
        [--num-sampling-steps N] [--cfg-scale S] [--seed S] [--batch-size B]
        [--dtype fp32|fp16|bf16] [--save-dir DIR] [--ckpt-path PATH]
        [--compile] [--cfg-parallel 1|2] [--cfg-options key=value ...]
    torchrun --nproc_per_node P tools/inference.py CONFIG ...   # sequence parallelism
    torchrun --nproc_per_node 2P tools/inference.py CONFIG --cfg-parallel 2   # CFG x SP

Flags override the config's keys of the same name; ``--cfg-options`` overrides any (nested)
key, e.g. ``--cfg-options model.depth=2 cache.type=DuCa`` (values are parsed like mmengine's
``DictAction``: numbers, True/False/None, lists ``[1,2]`` and tuples ``(1,2)``).
``--compile`` sets the config key ``compile = dict(mode="default")`` (unless the config has
one): the per-block work runs compiled with torch.compile, cached or not (docs/speed.md).

Prompts: ``--prompt`` wins over ``--prompt-path`` (one prompt per line; blank lines are
dropped), then the config's ``prompt`` list, then its ``prompt_path``.

Output: rank 0 writes ``{save_dir}/{sample_name}_{i:04d}.mp4`` (``sample_name`` defaults to
``sample``, a plain prefix: a value with '/', '\\' or '..' is refused; ``i`` is the prompt's
index in the prompt list) or, with ``--prompt-as-path``,
``{save_dir}/{prompt with unsafe characters dropped, spaces as _}.mp4``; prompts that map to the
same name get ``-`` and 8 hex digits of the SHA-1 of their text appended (a repeated prompt also
``-{i}``), so every prompt has its own file. Files are written to a temporary file of their own
and renamed when complete. Beside every video, ``{name}.json`` records what produced it (the
prompt, its seed, and the settings that decide the output -- model and its checkpoint file's
size and time, cache policy, sampler, sizes, dtype -- with their sha256 digest); it is written
before the video. A complete existing video is skipped only when its record matches this
run's, so rerunning the same command resumes an interrupted run; one made by other settings
(or without a record) is refused before the model is built (one line, exit 2), never replaced;
with ``--prompt-as-path`` a file of another prompt that maps to the same name is kept and the
new prompt gets ``-`` and 8 hex digits of the SHA-1 of its text appended.
``--save-latents`` also writes ``{name}.latents.pt`` (the float32 sampled latents). The noise
of prompt ``i`` is seeded with ``seed + i``, so a prompt's video does not depend on batching or
on what was skipped.

Under torchrun every rank runs the same prompts with the same seed; the model shards tokens
over the ranks (``enable_sequence_parallelism=True``); only rank 0 writes files and prints.
With ``--cfg-parallel 2`` (config key ``cfg_parallel``) the conditional and unconditional halves
of the guidance batch run on two groups of P = world / 2 ranks, each sequence-parallel.
The process group uses NCCL on CUDA and gloo on the CPU (torch.distributed; colossalai is not
needed, and its launcher keeps references to the group after it is destroyed). Before
anything is built the config is checked (:mod:`opensora_duca.config_check`: unknown keys, ranges,
sizes that cannot fit) and every rank checks that all ranks share the same settings
(:mod:`opensora_duca.parallel.agreement`); a mistake is one line on stderr and exit code 2.
``--dist-timeout`` (config key ``dist_timeout``, seconds, default 600) bounds how long a rank
waits for a stalled or dead one (exit code 1). Sampled latents with NaN or Inf are reported as
such (exit code 1, nothing written for that prompt); SIGTERM ends the run with exit code 143
and the file being written is removed (finished files stay). See docs/failure-behaviour.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from mmengine.config import DictAction
from safetensors import SafetensorError

from ..config_check import (
    check_device,
    check_inference_config,
    check_v2_inference_config,
    dist_timeout,
    run_settings,
    v2_run_settings,
)
from ..parallel import release_process_group
from ..parallel.agreement import check_ranks_agree
from ..parallel.launch import init_distributed
from ..pipeline import append_scores, build_from_config, load_prompts, unique_filenames
from ..pipeline_v2 import apply_cli_overrides, build_v2_from_config, is_v2_config
from ..utils.atomic import check_writable, save_torch, write_json
from ..utils.config import load_config, plain
from ..utils.host_memory import keep_freed_host_memory
from ..utils.video import is_complete_video, save_video


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="mmengine config file (Open-Sora key names)")
    p.add_argument("--prompt", nargs="+", default=None, help="one or more prompts")
    p.add_argument("--prompt-path", default=None, help="text file, one prompt per line")
    p.add_argument("--start-index", type=int, default=None, help="first prompt index to run")
    p.add_argument("--end-index", type=int, default=None, help="prompt index to stop before")
    p.add_argument("--num-frames", default=None, help="frame count or a name such as 2s")
    p.add_argument("--resolution", default=None, help="e.g. 240p, 480p, 720p")
    p.add_argument("--aspect-ratio", default=None, help="height:width, e.g. 9:16")
    p.add_argument("--image-size", nargs=2, type=int, default=None, metavar=("H", "W"))
    p.add_argument("--fps", type=float, default=None, help="fps conditioning of the model")
    p.add_argument("--save-fps", type=float, default=None, help="fps of the written files")
    p.add_argument("--num-sampling-steps", type=int, default=None)
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--save-dir", default=None)
    p.add_argument("--sample-name", default=None, help="file name prefix (default: sample)")
    p.add_argument("--prompt-as-path", action="store_true", help="name files after prompts")
    p.add_argument("--save-latents", action="store_true", help="also write {name}.latents.pt")
    p.add_argument("--ckpt-path", default=None, help="model weights (replaces from_pretrained)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="seconds a rank waits for the others before failing (default 600)")
    p.add_argument("--compile", action="store_true",
                   help="run the per-block work compiled (torch.compile); the config key "
                        "compile=dict(mode=..., backend=...) sets the options")
    p.add_argument("--cfg-parallel", type=int, default=None,
                   help="2: the conditional and unconditional halves of the guidance batch on "
                        "two groups of ranks (world size divisible by 2); 1: off")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default=None,
                   help="override config keys: key=value (nested keys with dots)")
    return p.parse_args(argv)


def merge_args(cfg, args):
    """The config with the command line's flags merged in (flags win)."""
    if is_v2_config(cfg):  # Open-Sora 2.0: the flags map to upstream's keys
        return apply_cli_overrides(cfg, vars(args))
    if args.prompt is not None:
        cfg.prompt = list(args.prompt)
    elif args.prompt_path is not None:
        cfg.prompt = None
        cfg.prompt_path = args.prompt_path
    if args.image_size is not None:
        cfg.image_size = tuple(args.image_size)
    elif args.resolution is not None or args.aspect_ratio is not None:
        cfg.image_size = None  # the named size wins over the config's image_size
    for key in ("resolution", "aspect_ratio", "num_frames", "fps", "save_fps", "seed",
                "batch_size", "dtype", "save_dir", "sample_name", "dist_timeout",
                "cfg_parallel"):
        val = getattr(args, key)
        if val is not None:
            cfg[key] = val
    if args.num_sampling_steps is not None:
        cfg.scheduler["num_sampling_steps"] = args.num_sampling_steps
    if args.cfg_scale is not None:
        cfg.scheduler["cfg_scale"] = args.cfg_scale
    if args.ckpt_path is not None:
        cfg.model["from_pretrained"] = args.ckpt_path
    if args.compile and not cfg.get("compile"):
        cfg.compile = dict(mode="default")
    return cfg


def resolve_prompts(cfg) -> list[str]:
    prompts = cfg.get("prompt")
    if prompts is None and cfg.get("prompt_path"):
        prompts = load_prompts(cfg.prompt_path)
    if prompts is None:
        raise SystemExit("no prompts: give --prompt, --prompt-path, or set prompt / prompt_path "
                         "in the config")
    if isinstance(prompts, str):
        prompts = [prompts]
    return list(prompts)


def check_sample_name(name) -> str:
    """``sample_name`` must be a plain file-name prefix, so files stay inside ``save_dir``."""
    if not isinstance(name, str) or not name.strip() or "/" in name or "\\" in name \
            or ".." in name or os.path.isabs(name) or "\0" in name:
        raise ValueError(f"sample_name={name!r} is not accepted; accepted: a non-empty file-name "
                         f"prefix without '/', '\\' or '..' (files are written inside save_dir)")
    return name


def output_names(cfg, args, prompts: list[str]) -> list[str]:
    """The file name (without extension) of every prompt of the list, all distinct:
    ``{sample_name}_{i:04d}``, or with ``--prompt-as-path`` the prompt made file-name safe
    (disambiguated by :func:`opensora_duca.pipeline.unique_filenames` when two prompts map to
    the same name)."""
    if args.prompt_as_path:
        return unique_filenames(prompts)
    name = cfg.get("sample_name")
    prefix = "sample" if name is None else check_sample_name(name)
    return [f"{prefix}_{i:04d}" for i in range(len(prompts))]


#: config keys that do not change what a prompt's video holds (not part of its identity)
NOT_IDENTITY = ("prompt", "prompt_path", "save_dir", "sample_name", "batch_size", "dist_timeout",
                "compile", "cfg_parallel", "compare_caches", "custom_imports")


def _checkpoint_files(value, out: dict) -> dict:
    """Size and modification time of every existing file a ``from_pretrained``-like string
    of the config names (a changed checkpoint at the same path is another model)."""
    if isinstance(value, dict):
        for v in value.values():
            _checkpoint_files(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _checkpoint_files(v, out)
    elif isinstance(value, str) and len(value) < 4096 and os.path.isfile(value):
        st = os.stat(value)
        out[os.path.abspath(value)] = [st.st_size, st.st_mtime_ns]
    return out


def run_identity(cfg, prompt: str, seed: int) -> dict:
    """What decides one prompt's video: the prompt, its seed and the config's settings (the
    keys of :data:`NOT_IDENTITY` aside) with the checkpoint files' size and time; ``digest``
    is the sha256 of the rest as canonical JSON."""
    settings = {k: v for k, v in plain(cfg).items() if k not in NOT_IDENTITY}
    ident = dict(prompt=prompt, seed=int(seed),
                 settings=json.loads(json.dumps(settings, sort_keys=True, default=repr)),
                 files=_checkpoint_files(settings, {}))
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return dict(ident, digest=hashlib.sha256(blob.encode("utf-8")).hexdigest())


def _record(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"


def plan_outputs(cfg, args, prompts: list, indices: list, save_dir: str, seed: int):
    """(names, todo): the file name of every prompt index and the indices still to generate.

    A complete video is done when its record (``{name}.json``) matches this run's identity;
    a video of another prompt under a ``--prompt-as-path`` name moves the new prompt to its
    hashed name; any other video made by other settings, or without a record, raises a
    one-line ``ValueError`` (the file is kept)."""
    all_names = output_names(cfg, args, prompts)
    names, todo = {}, []
    for i in indices:
        name = all_names[i]
        ident = run_identity(cfg, prompts[i], seed + i)
        video = os.path.join(save_dir, name + ".mp4")
        rec = _record(os.path.join(save_dir, name + ".json"))
        if args.prompt_as_path and is_complete_video(video) and rec is not None \
                and rec.get("prompt") != prompts[i]:
            name = f"{name}-{hashlib.sha1(prompts[i].encode('utf-8')).hexdigest()[:8]}"
            video = os.path.join(save_dir, name + ".mp4")
            rec = _record(os.path.join(save_dir, name + ".json"))
        names[i] = name
        if is_complete_video(video):
            if rec is None or rec.get("digest") != ident["digest"]:
                diff = [f"no record ({name}.json)"] if rec is None else sorted(
                    [k for k in ("prompt", "seed", "files") if rec.get(k) != ident[k]]
                    + [k for k in set(ident["settings"]) | set(rec.get("settings") or {})
                       if (rec.get("settings") or {}).get(k) != ident["settings"].get(k)])
                raise ValueError(
                    f"{video} exists and was made by other settings (differs in "
                    f"{', '.join(diff) or 'its digest'}); it is kept: give another --save-dir "
                    f"or --sample-name, or remove it (prompt {i}: {_short(prompts[i])!r})")
            if args.save_latents and not os.path.isfile(
                    os.path.join(save_dir, name + ".latents.pt")):
                todo.append(i)
        else:
            todo.append(i)
    # the outputs can be written (checked before the model is built): the folder, and names
    # that fit the file system with the writer's temporary suffix
    check_writable(save_dir, "save_dir", folder=True)
    for i in todo:
        check_writable(os.path.join(save_dir, names[i] + ".latents.pt"),
                       "prompt file name" if args.prompt_as_path else "sample_name")
    return names, todo


def parallel_layout(pipe, world: int) -> str:
    """How the ranks share the work, for the summary."""
    if pipe.cfg_parallel is None:
        return f"sequence parallel: {'on' if world > 1 else 'off'}"
    return pipe.cfg_parallel.describe()


class OutputError(RuntimeError):
    """Writing a finished result failed (a disk or permission problem, not the config)."""


def _write(write, path: str, *args, **kwargs) -> None:
    try:
        write(*args, **kwargs)
    except Exception as err:
        raise OutputError(f"could not write {path}: {type(err).__name__}: {err}") from err


def main(argv=None, t_start=None) -> int:
    """Run the tool; ``t_start`` is the ``time.perf_counter()`` the wall time counts from
    (the wrapper's start, so imports count)."""
    keep_freed_host_memory()  # CPU runs: no page faults per step
    t_start = time.perf_counter() if t_start is None else t_start
    args = parse_args(argv)
    cfg, world = {}, 1
    # SIGTERM (torchrun stops the surviving ranks with it) ends the run like Ctrl-C: the
    # writer in progress removes its temporary file, nothing half-written stays
    previous = _on_sigterm()
    try:
        # the settings are checked before anything is built or waits for other ranks
        cfg = merge_args(load_config(args.config, args.cfg_options), args)
        check_device(args.device)
        check = check_v2_inference_config if is_v2_config(cfg) else check_inference_config
        check(cfg, args.start_index, args.end_index, device=args.device or (
            "cuda" if torch.cuda.is_available() else "cpu"))
        rank, world, device = init_distributed(args.device, dist_timeout(cfg))
        agreed = v2_run_settings if is_v2_config(cfg) else run_settings
        check_ranks_agree(agreed(cfg, args.start_index, args.end_index))
        return run(cfg, args, rank, world, device, rank == 0, t_start)
    except (KeyError, ValueError, TypeError, OSError, ImportError, SafetensorError,
            pickle.UnpicklingError) as err:
        # configuration mistakes: one clear line (the message names the key and the accepted
        # values) instead of a traceback
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        msg = str(msg).strip().splitlines()[0] if str(msg).strip() else repr(err)
        if isinstance(err, pickle.UnpicklingError):  # torch's text suggests an unsafe load
            msg = "a weights file holds more than tensors (or is no checkpoint); refused"
        print(f"inference.py: error: {type(err).__name__}: {_cap(msg)}", file=sys.stderr,
              flush=True)
        return 2
    except (OutputError, NonFiniteOutput) as err:
        print(f"inference.py: error: {_cap(str(err))}", file=sys.stderr, flush=True)
        return 1
    except (dist.DistError, RuntimeError) as err:
        if not isinstance(err, dist.DistError) and not _is_rank_failure(err, world):
            raise
        # a rank died or stalled: fail instead of waiting forever (gloo raises RuntimeError)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"inference.py: error: {type(err).__name__} (a rank died or did not answer "
              f"within dist_timeout={_timeout_or_default(cfg)} s): {_cap(first)}",
              file=sys.stderr, flush=True)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        release_process_group()  # after the pipeline is gone; collects cycles, then destroys


class Terminated(SystemExit):
    """SIGTERM arrived: the run stops (exit code 143) and unwinds its writers."""


def _on_sigterm():
    """Install the SIGTERM handler (main thread only); the previous handler, or None."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        print("inference.py: terminated (SIGTERM); unfinished files removed", file=sys.stderr,
              flush=True)
        raise Terminated(128 + signum)
    return signal.signal(signal.SIGTERM, handler)


def _is_rank_failure(err: BaseException, world: int) -> bool:
    """A collective's failure under torchrun (gloo raises RuntimeError on a timeout or a closed
    peer), as opposed to a bug."""
    text = str(err).lower()
    return world > 1 and any(
        w in text for w in ("gloo", "timed out", "timeout", "connection closed", "nccl",
                            "connection reset", "broken pipe"))


def _timeout_or_default(cfg) -> object:
    try:
        return dist_timeout(cfg)
    except (ValueError, AttributeError):
        return "?"


def _cap(text: str, n: int = 500) -> str:
    """One error line of at most about ``n`` characters (a 500 KB prompt is not echoed)."""
    text = str(text)
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters in all)"


class NonFiniteOutput(RuntimeError):
    """The sampler produced NaN or Inf (a diverging cfg_scale, broken weights)."""


def run(cfg, args, rank, world, device, is_main, t_start) -> int:
    from tqdm import tqdm

    prompts = resolve_prompts(cfg)
    start = args.start_index or 0
    end = len(prompts) if args.end_index is None else args.end_index
    indices = list(range(start, min(end, len(prompts))))
    save_dir = cfg.get("save_dir") or "./samples/samples/"
    seed = int(cfg.get("seed", 0))

    # decide once (rank 0) what is already done, so every rank runs the same batches (and
    # every rank stops on a refused file)
    try:
        plan = plan_outputs(cfg, args, prompts, indices, save_dir, seed) if is_main else None
    except ValueError as err:
        plan = err
    if world > 1:
        box = [plan]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
    if isinstance(plan, ValueError):
        raise plan
    names, todo = plan
    skipped = [i for i in indices if i not in todo]

    t_build = time.perf_counter()
    build = build_v2_from_config if is_v2_config(cfg) else build_from_config
    pipe = build(cfg, device=device, enable_sequence_parallelism=world > 1)
    t_build = time.perf_counter() - t_build
    # (the 2.0 pipeline's T5 / CLIP pair takes any text: nothing to check up front)
    tokenize = getattr(getattr(pipe, "text_encoder", None), "tokenize", None)
    if callable(tokenize) and todo:  # every prompt, before the first video (unknown words),
        # as generate gives them to the text encoder (with the aes / flow scores appended)
        tokenize(append_scores([prompts[i] for i in todo], getattr(pipe, "aes", None),
                               getattr(pipe, "flow", None)))
    batch_size = int(cfg.get("batch_size") or 1)
    save_fps = cfg.get("save_fps") or cfg.get("fps", 24)
    if is_main:
        os.makedirs(save_dir, exist_ok=True)
        for i in skipped:
            print(f"[skip] {os.path.join(save_dir, names[i])}.mp4 exists", flush=True)

    sample_s = 0.0
    written = []
    last = None
    batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
    bar = tqdm(batches, desc="batches", disable=not is_main or args.no_progress or not batches)
    for batch in bar:
        out = pipe.generate([prompts[i] for i in batch], seeds=[seed + i for i in batch],
                            batch_size=len(batch), progress=is_main and not args.no_progress)
        sample_s += out["timings"]["total_s"]
        last = out
        if is_main:
            for j, i in enumerate(batch):
                path = os.path.join(save_dir, names[i] + ".mp4")
                if not bool(torch.isfinite(out["latents"][j]).all()):
                    raise NonFiniteOutput(
                        f"the sampled latents of prompt {i} ({_short(prompts[i])!r}) are not "
                        f"finite (NaN or Inf): the sampler diverged (cfg_scale="
                        f"{pipe.scheduler.cfg_scale}, dtype "
                        f"{str(pipe.dtype).replace('torch.', '')}) or the weights hold NaN; "
                        f"nothing written for it")
                rec = os.path.join(save_dir, names[i] + ".json")  # before the video
                _write(write_json, rec, rec, run_identity(cfg, prompts[i], seed + i))
                if args.save_latents:
                    lat = os.path.join(save_dir, names[i] + ".latents.pt")
                    _write(save_torch, lat, lat, out["latents"][j].clone())
                _write(save_video, path, out["video"][j], path, fps=save_fps)
                written.append(path)
                tqdm.write(f"[saved] {path}")

    if is_main:
        sched = pipe.scheduler
        h, w = pipe.defaults["image_size"] if last is None else last["image_size"]
        nf = pipe.defaults["num_frames"] if last is None else last["num_frames"]
        lines = [
            "=== inference summary ===",
            f"config: {args.config}",
            f"videos: {len(written)} written, {len(skipped)} skipped (existing) -> {save_dir}",
            f"video: {nf} frames, {h}x{w} (HxW), latent {pipe.latent_size(nf, h, w)}, "
            f"save fps {save_fps}",
            f"sampler: {type(sched).__name__} {sched.num_sampling_steps} steps, "
            f"cfg {sched.cfg_scale}, seed {seed}, batch size {batch_size}",
            f"ranks: {world} ({parallel_layout(pipe, world)}), device {device}, "
            f"dtype {str(pipe.dtype).replace('torch.', '')}",
            f"wall time: {time.perf_counter() - t_start:.2f} s (build {t_build:.2f} s, "
            f"generate {sample_s:.2f} s)",
        ]
        report = pipe.report()
        if report:
            lines += ["--- cache ---", report.rstrip()]
        print("\n".join(lines), flush=True)
    return 0
