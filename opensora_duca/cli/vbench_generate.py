"""Generate the videos VBench scores: ``{prompt}-{i}.mp4`` for every prompt of the suite and every
sample index i in 0..num_samples-1, with any cache policy, resumable, on one or many ranks.

Usage::

    python tools/vbench_generate.py CONFIG [--prompt-path FILE] [--dimensions DIM ...]
        [--num-samples 5] [--seed S] [--start I] [--end J] [--save-dir DIR] [--batch-size B]
        [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--ckpt-path PATH] [--no-progress]
        [--cfg-options key=value ...]
    torchrun --nproc_per_node P tools/vbench_generate.py CONFIG ...  # sequence parallel
    torchrun --nproc_per_node P tools/vbench_generate.py CONFIG --data-parallel ...  # shards

Prompts: ``--prompt-path`` (one per line) or the suite shipped in the installed ``vbench`` package
(``VBench_full_info.json``), optionally only the prompts tagged with ``--dimensions``; then the
prompt slice ``[--start, --end)``. Sample i of every prompt uses the noise seed ``seed + i``
(``seed`` defaults to the config's), so a cached and an uncached run get the same noise and their
videos can be compared frame by frame. The file name is the prompt as VBench gives it (Open-Sora's
"aesthetic score" phrase, when the config sets ``aes``, is appended to the encoded text only).

Caching: the config's top-level ``cache = dict(type=...)``, or ``--cfg-options cache.type=DuCa``
(any registered policy and its keys, e.g. ``cache.fresh_ratio=0.1``).

Resuming: a file that already decodes is skipped; files are written to a temporary file of their
own (``.{name}.{pid}-{host}.{random}.partial``) and renamed when complete (``save_video``), and
the temporary files of this run's jobs left by processes that have ended (same host) are
removed at start; those of running processes are left alone. An interrupted run is therefore
resumed by running the same command again and never leaves a half-written video under a final
name.

Cost records: next to each video, ``_meta/{video name}.json`` holds what the paper table of
``tools/vbench_evaluate.py --reference`` needs: the prompt, sample index and seed, the cache
policy, the seconds the batch that made it took divided by its videos (wall time of
``Pipeline.generate``, text encoding and decoding included), and the analytic trunk FLOPs of an
uncached and of the actual run, per video. Written atomically with the video, and kept when a
resumed run skips the video.

Parallelism: under torchrun, by default all ranks cooperate on each sample (sequence
parallelism) and rank 0 decides the job list and writes the files. With ``--data-parallel``
each rank takes its own round-robin share of the prompts (sequence parallelism off) and writes
its own files; ``--start/--end`` select a prompt slice either way (to split work across jobs by
hand). The progress bar is shown on rank 0.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch.distributed as dist
from mmengine.config import DictAction

from ..eval import vbench as vb
from ..eval import vbench_table
from ..parallel import release_process_group
from ..parallel.launch import init_distributed
from ..pipeline import build_from_config
from ..utils.atomic import remove_stale_temps, write_json
from ..utils.config import load_config
from ..utils.host_memory import keep_freed_host_memory
from ..utils.video import save_video

META_DIR = vbench_table.META_DIR  # per-video cost records, beside the videos


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="inference config (Open-Sora key names)")
    p.add_argument("--prompt-path", default=None, help="text file, one prompt per line "
                   "(default: the installed vbench package's suite)")
    p.add_argument("--dimensions", nargs="+", default=None,
                   help="only suite prompts tagged with these VBench dimensions")
    p.add_argument("--num-samples", type=int, default=5, help="videos per prompt (VBench: 5)")
    p.add_argument("--seed", type=int, default=None, help="sample i uses seed + i "
                   "(default: the config's seed, else 0)")
    p.add_argument("--start", type=int, default=0, help="first prompt index")
    p.add_argument("--end", type=int, default=None, help="prompt index to stop before")
    p.add_argument("--save-dir", default=None, help="output folder (default: the config's "
                   "save_dir, else ./samples/vbench)")
    p.add_argument("--batch-size", type=int, default=None, help="videos per model batch")
    p.add_argument("--data-parallel", action="store_true",
                   help="under torchrun: shard prompts over ranks instead of sequence parallelism")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--ckpt-path", default=None, help="model weights (replaces from_pretrained)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--label", default=None, help="name of this run in the paper table (default: "
                   "the cache policy, 'uncached' without one)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default=None,
                   help="override config keys: key=value (nested keys with dots)")
    return p.parse_args(argv)


def _check_args(args):
    if args.num_samples < 1:
        raise ValueError(f"--num-samples={args.num_samples!r} is not accepted; accepted: an int "
                         f">= 1")
    if args.start < 0:
        raise ValueError(f"--start={args.start!r} is not accepted; accepted: an int >= 0")
    if args.end is not None and args.end < args.start:
        raise ValueError(f"--end={args.end!r} is not accepted; accepted: an int >= --start "
                         f"({args.start})")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size!r} is not accepted; accepted: an int >= 1")


def load_suite(args):
    if args.prompt_path is not None and not os.path.isfile(args.prompt_path):
        raise FileNotFoundError(f"--prompt-path={args.prompt_path!r} is not an existing file; "
                                f"accepted: a text file with one prompt per line")
    try:
        prompts = vb.load_prompts(args.prompt_path, args.dimensions)
    except vb.VBenchUnavailable as e:
        raise ValueError(f"no prompt suite ({str(e).splitlines()[0]}); pass --prompt-path FILE "
                         f"or install vbench") from None
    if not prompts:
        raise ValueError("the prompt list is empty")
    return prompts


def main(argv=None) -> int:
    keep_freed_host_memory()  # CPU runs: no page faults per step
    args = parse_args(argv)
    try:  # bad input: one line, exit 2, before any model is built
        _check_args(args)
        if not os.path.isfile(args.config):
            raise FileNotFoundError(f"config {args.config!r} is not an existing file")
        cfg = load_config(args.config, args.cfg_options)
        prompts = load_suite(args)
        check_cache_config(cfg)
    except (ValueError, FileNotFoundError, KeyError, TypeError, vb.VBenchUnavailable) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        msg = str(msg).strip().splitlines()[0] if str(msg).strip() else repr(err)
        print(f"vbench_generate: error: {msg}", file=sys.stderr, flush=True)
        return 2
    rank, world, device = init_distributed(args.device)
    try:
        return run(cfg, args, rank, world, device, prompts)
    finally:
        release_process_group()  # collects what still holds the group, then destroys it


def check_cache_config(cfg) -> None:
    """A ``cache`` entry names a registered policy with accepted keys (built once, no model)."""
    cache = cfg.get("cache")
    if cache:
        from ..cache import build_policy

        build_policy(dict(cache))


def run(cfg, args, rank, world, device, prompts) -> int:
    from tqdm import tqdm

    t_start = time.perf_counter()
    data_parallel = args.data_parallel and world > 1
    is_main = rank == 0
    writer = data_parallel or is_main  # who writes this rank's files
    save_dir = args.save_dir or cfg.get("save_dir") or "./samples/vbench"
    seed = args.seed if args.seed is not None else int(cfg.get("seed") or 0)
    end = len(prompts) if args.end is None else min(args.end, len(prompts))
    mine = list(range(args.start, end))
    if data_parallel:
        mine = vb.shard(mine, rank, world)
    mine_set = set(mine)

    all_jobs = [j for j in vb.list_jobs(prompts, save_dir, args.num_samples, seed, args.start,
                                        end, skip_complete=False) if j.prompt_index in mine_set]
    if writer:
        os.makedirs(save_dir, exist_ok=True)
        stale = sum(remove_stale_temps(j.path) for j in all_jobs)
        todo = [j for j in vb.list_jobs(prompts, save_dir, args.num_samples, seed, args.start,
                                        end, skip_complete=True) if j.prompt_index in mine_set]
    else:
        stale, todo = 0, None
    if world > 1 and not data_parallel:  # rank 0 decides, every rank runs the same batches
        box = [todo]
        dist.broadcast_object_list(box, src=0)
        todo = box[0]
    skipped = len(all_jobs) - len(todo)

    pipe = build_from_config(cfg, device=device, dtype=args.dtype,
                             enable_sequence_parallelism=world > 1 and not data_parallel,
                             ckpt_path=args.ckpt_path)
    batch_size = args.batch_size or int(cfg.get("batch_size") or 1)
    save_fps = cfg.get("save_fps") or cfg.get("fps", 24)
    if is_main:
        mode = ("data parallel" if data_parallel else "sequence parallel") if world > 1 else \
            "single process"
        cache = pipe.cache_manager.policy.name if pipe.cache_manager is not None else "none"
        print(f"vbench_generate: {len(prompts)} prompts in the suite, prompts [{args.start}, "
              f"{end}), {args.num_samples} samples each, seed {seed} + i; {mode} on {world} "
              f"rank(s); cache {cache}; {skipped} complete file(s) skipped, {stale} stale "
              f"partial file(s) removed -> {save_dir}", flush=True)

    written = 0
    label = args.label or (pipe.cache_manager.policy.name if pipe.cache_manager is not None
                           else "uncached")
    meta_dir = os.path.join(save_dir, META_DIR)
    bar = tqdm(total=len(todo), desc="videos", disable=not is_main or args.no_progress)
    for b0 in range(0, len(todo), batch_size):
        batch = todo[b0:b0 + batch_size]
        if pipe.cache_manager is not None:
            pipe.cache_manager.reset_stats()
        t0 = time.perf_counter()
        out = pipe.generate([j.prompt for j in batch], seeds=[j.seed for j in batch],
                            batch_size=len(batch))
        seconds = time.perf_counter() - t0
        flops = None
        if pipe.cache_manager is not None:
            st = pipe.cache_manager.stats()
            flops = (st["flops_uncached"] / len(batch), st["flops_actual"] / len(batch))
        if writer:
            for k, job in enumerate(batch):
                save_video(out["video"][k], job.path, fps=save_fps)
                write_json(os.path.join(meta_dir, os.path.basename(job.path) + ".json"), {
                    "prompt": job.prompt, "index": job.index, "seed": job.seed,
                    "label": label, "cache": None if pipe.cache_manager is None else
                    pipe.cache_manager.policy.describe(),
                    "seconds": seconds / len(batch), "batch_size": len(batch),
                    "flops_uncached": None if flops is None else flops[0],
                    "flops_actual": None if flops is None else flops[1],
                    "device": str(device), "world_size": world,
                    "mode": "data parallel" if data_parallel else (
                        "sequence parallel" if world > 1 else "single process"),
                })
                written += 1
        bar.update(len(batch))
    bar.close()
    if world > 1 and dist.is_initialized():
        dist.barrier()
    if is_main:
        lines = [f"done: {written} video(s) written by rank 0"
                 + (" (each rank wrote its own shard)" if data_parallel else "")
                 + f", {skipped} skipped, in {time.perf_counter() - t_start:.1f} s"]
        report = pipe.report()
        if report:
            lines += ["--- cache (last batch) ---", report.rstrip()]
        print("\n".join(lines), flush=True)
    return 0
