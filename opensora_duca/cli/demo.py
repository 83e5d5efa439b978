"""The main job: generate with the demo model uncached, with the configured cache policy (DuCa)
and with every policy of the config's ``compare_caches`` ({run name: cache config}), then report
speed, the caption judge's verdicts and fidelity against the uncached video.

    torchrun --nproc_per_node 2 tools/demo.py configs/demo/inference.py   # sequence parallel
    python tools/demo.py configs/demo/inference.py [--prompt ...] [--save-dir DIR]

All runs use the same prompts and seeds (and the same weights). Timings are the sampling wall
time after one warm-up generation, measured the same way for every run. Rank 0 writes
``{save_dir}/{uncached,<policy>,<compare name>}/{prompt}.mp4`` (atomically; names as
``--prompt-as-path`` of ``tools/inference.py``) and ``{save_dir}/summary.json``.
"""
from __future__ import annotations

import argparse
import os
import sys

from mmengine.config import DictAction

from ..cache import apply_cache, build_policy, remove_cache
from ..cache.calibrate import check_calibration_model
from ..eval.fidelity import psnr, ssim
from ..eval.judge import judge, summarize
from ..parallel import release_process_group
from ..parallel.agreement import check_ranks_agree
from ..parallel.launch import init_distributed
from ..pipeline import build_from_config, unique_filenames
from ..utils.atomic import check_writable, write_json
from ..utils.config import load_config, plain
from ..utils.host_memory import keep_freed_host_memory
from ..utils.video import save_video, to_uint8_frames


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="mmengine config (configs/demo/inference.py)")
    p.add_argument("--prompt", nargs="+", default=None, help="prompts (default: the config's)")
    p.add_argument("--save-dir", default=None, help="output folder (default: the config's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-sampling-steps", type=int, default=None)
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default=None,
                   help="override config keys, e.g. cache.type=ToCa")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the demo; the process group (under torchrun) is released once the models are gone."""
    keep_freed_host_memory()  # CPU runs: no page faults per step
    try:
        return _demo(parse_args(argv))
    finally:
        release_process_group()  # after _demo's models are out of scope; then destroys the group


def _plain(cfg):
    return dict(plain(cfg))


def _policies(cfg) -> dict:
    """{run name: cache config}: the config's ``cache`` (named by its type), then each entry of
    ``compare_caches`` ({name: cache config}), all validated before anything is built."""
    cache_cfg = cfg.get("cache")
    if cache_cfg is None:
        raise ValueError("the config has no `cache = dict(type=...)`: nothing to compare")
    out = {_plain(cache_cfg)["type"]: _plain(cache_cfg)}
    extra = cfg.get("compare_caches") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"compare_caches={extra!r} is not accepted; accepted: a dict "
                         f"{{run name: dict(type=...)}}")
    for name, c in extra.items():
        if not isinstance(name, str) or not name.strip() or name in (".", "..") \
                or any(c in name for c in "/\\\0") or name in ("uncached", *out):
            raise ValueError(f"compare_caches: run name {name!r} is not accepted; accepted: a "
                             f"new non-empty folder name (not '.' or '..', without '/', '\\' "
                             f"or NUL; the run's videos go to save_dir/<name>)")
        out[name] = _plain(c)
    for c in out.values():
        build_policy(c)  # a bad key or value fails here, with the key named
    return out


def _demo(args) -> int:
    try:
        cfg = load_config(args.config, args.cfg_options)
        policies = _policies(cfg)
        prompts = cfg.get("prompt") if args.prompt is None else args.prompt
        if isinstance(prompts, str):  # one prompt, not a list of its characters
            prompts = [prompts]
        prompts = list(prompts or [])
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("no prompts: give --prompt or a `prompt` (a string or a list of "
                             "non-empty strings) in the config")
        if args.num_sampling_steps is not None and args.num_sampling_steps < 1:
            raise ValueError(f"--num-sampling-steps {args.num_sampling_steps}: accepted: an "
                             f"integer >= 1")
        if args.num_sampling_steps is not None:  # e.g. DuCa's warmup needs its steps
            for c in policies.values():
                build_policy(c).validate_run(args.num_sampling_steps)
        if args.seed is not None and not 0 <= args.seed < 2 ** 63:
            raise ValueError(f"--seed {args.seed}: accepted: an integer in [0, 2**63)")
        check_writable(args.save_dir or cfg.get("save_dir", "./samples/demo"), "save_dir",
                       folder=True)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        msg = str(msg).strip().splitlines()[0] if str(msg).strip() else type(err).__name__
        print(f"demo.py: error: {msg}", file=sys.stderr, flush=True)
        return 2
    cfg.cache = None  # built uncached; the policies are attached run by run
    cfg.compare_caches = None
    seed = cfg.get("seed", 0) if args.seed is None else args.seed
    save_dir = args.save_dir or cfg.get("save_dir", "./samples/demo")

    rank, world, device = init_distributed(None)
    try:  # every rank must generate the same videos
        check_ranks_agree(dict(config=cfg.to_dict(), cache=policies, prompts=prompts, seed=seed,
                               steps=args.num_sampling_steps, save_dir=save_dir))
    except ValueError as err:
        print(f"demo.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    is_main = rank == 0
    pipe = build_from_config(cfg, device=device, enable_sequence_parallelism=world > 1)
    try:  # before any clip: a calibration file fitted on another model
        for c in policies.values():
            check_calibration_model(build_policy(c), pipe.model)
    except ValueError as err:
        print(f"demo.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    steps = pipe.scheduler.num_sampling_steps if args.num_sampling_steps is None \
        else args.num_sampling_steps
    gen = dict(seed=seed, num_sampling_steps=steps, batch_size=len(prompts))
    pipe.generate(prompts[:1], seed=seed, num_sampling_steps=2)  # warm-up (allocations, threads)

    runs = {}
    for name, policy_cfg in (("uncached", None), *policies.items()):
        if policy_cfg is not None:
            pipe.cache_manager = apply_cache(pipe.model, policy_cfg)
        out = pipe.generate(prompts, progress=is_main, **gen)
        runs[name] = dict(out=out, stats=pipe.cache_manager.stats() if pipe.cache_manager else None,
                          report=pipe.report())
        remove_cache(pipe.model)
        pipe.cache_manager = None
    if not is_main:
        return 0

    base = runs["uncached"]["out"]
    names = unique_filenames(prompts)
    rows = []
    for name, run in runs.items():
        out = run["out"]
        verdicts, files = [], []
        for i, prompt in enumerate(prompts):
            frames = to_uint8_frames(out["video"][i])
            path = os.path.join(save_dir, name, names[i] + ".mp4")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_video(out["video"][i], path, fps=cfg.get("save_fps", 8))
            files.append(path)
            verdicts.append(judge(frames, prompt))
        v01, b01 = (out["video"] + 1) / 2, (base["video"] + 1) / 2
        fid = dict(psnr=psnr(v01.transpose(1, 2), b01.transpose(1, 2), layout="BTCHW"),
                   ssim=ssim(v01.transpose(1, 2), b01.transpose(1, 2), layout="BTCHW"))
        st = run["stats"] or {}
        rows.append(dict(run=name, sample_s=out["timings"]["sample_s"],
                         speedup=base["timings"]["sample_s"] / out["timings"]["sample_s"],
                         flops_ratio=st.get("flops_ratio", 1.0),
                         peak_cache_mib=st.get("peak_stored_bytes", 0) / 2 ** 20,
                         steps_by_kind=st.get("steps_by_kind", {"full": steps}),
                         judge=summarize(verdicts), psnr=fid["psnr"], ssim=fid["ssim"],
                         files=files,
                         verdicts=[dict(prompt=p, ok=v["ok"], color=v["detected_color"],
                                        direction=v["detected_direction"])
                                   for p, v in zip(prompts, verdicts)]))

    print(f"\nDemo model, {len(prompts)} prompts, {steps} rflow steps, {world} rank(s), "
          f"{device.type}; videos under {save_dir}/")
    print("| run | sampling s | speedup | FLOPs ratio | peak cache MiB | judge ok | PSNR dB "
          "| SSIM |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        j = r["judge"]
        print(f"| {r['run']} | {r['sample_s']:.2f} | {r['speedup']:.2f}x | {r['flops_ratio']:.2f}x "
              f"| {r['peak_cache_mib']:.1f} | {sum(v['ok'] for v in r['verdicts'])}/{j['n']} "
              f"| {r['psnr']:.2f} | {r['ssim']:.4f} |")
    print("\nJudge verdicts (colour and motion right, one object?):")
    for i, prompt in enumerate(prompts):
        parts = [f"{r['run']} {'ok' if r['verdicts'][i]['ok'] else 'WRONG'} "
                 f"({r['verdicts'][i]['color']}, {r['verdicts'][i]['direction']})" for r in rows]
        print(f"  {prompt!r}: " + "; ".join(parts))
    for name in policies:
        print(f"\n[{name}]\n" + (runs[name]["report"] or ""))
    write_json(os.path.join(save_dir, "summary.json"),
               dict(config=args.config, prompts=prompts, seed=seed, steps=steps,
                    world_size=world, device=device.type, runs=rows))
    return 0
