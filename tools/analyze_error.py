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
import statistics
import sys
import time
from typing import Dict, List, Optional

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))
sys.path.insert(0, TOOLS)

import torch  # noqa: E402

import benchmark as bm  # noqa: E402  (tools/benchmark.py: presets and benches)

DEFAULT_POLICIES = "none,DuCa,ToCa,FORA,PAB,TrunkReuse"


# ------------------------------------------------------------------------- sampling steps
class Stepper:
    """One rflow step at a time, exactly as ``RFlow.sample`` does it (CFG batch [z, z] with
    captions [y, y_null], v = v_u + cfg (v_c - v_u), z += v (t_i - t_{i+1}) / num_timesteps)."""

    def __init__(self, bench: "bm.Bench"):
        self.b = bench
        self.ts = bench.timesteps()
        self.y_in = torch.cat([bench.y, bench.y_null], 0)
        m = bench.mask
        self.m_in = None if m is None else (torch.cat([m, m], 0) if m.shape[0] == bench.y.shape[0]
                                            else m)
        self.cfg = bench.scheduler.cfg_scale
        self.n_t = bench.scheduler.num_timesteps
        self.c = bench.z0.shape[1]

    @torch.no_grad()
    def model_out(self, z: torch.Tensor, i: int):
        """(velocity channels of the model output [2B, C, ...], guided velocity [B, C, ...])."""
        t = self.ts[i]
        z_in = torch.cat([z, z], 0)
        out = self.b.model(z_in, t.expand(z_in.shape[0]).to(z.dtype), self.y_in, mask=self.m_in,
                           **self.b.additional_args)
        v = out[:, : self.c] if out.shape[1] != self.c else out
        v_c, v_u = v.chunk(2, dim=0)
        return v, v_u + self.cfg * (v_c - v_u)

    def advance(self, z: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        t = self.ts[i]
        t_next = self.ts[i + 1] if i + 1 < len(self.ts) else torch.zeros_like(t)
        return z + v.to(z.dtype) * ((t - t_next) / self.n_t)


class TrunkHook:
    """Captures the output of ``model.temporal_blocks[-1]`` (the trunk output)."""

    def __init__(self, model):
        self.value = None
        self.h = model.temporal_blocks[-1].register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.value = out.detach().float().clone()

    def remove(self):
        self.h.remove()


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> List[float]:
    """Per-row (dim 0) relative L2 error, float64."""
    a, ref = a.double().flatten(1), ref.double().flatten(1)
    return ((a - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)).tolist()


def _mean(v):
    return float(statistics.fmean(v)) if v else None


@torch.no_grad()
def reference(bench, st: Stepper) -> dict:
    n = bench.num_steps
    hook = TrunkHook(bench.model)
    zs, outs, guided, trunks = [bench.z0.clone()], [], [], []
    try:
        z = zs[0]
        for i in range(n):
            v, g = st.model_out(z, i)
            outs.append(v.float().cpu())
            guided.append(g.float().cpu())
            trunks.append(hook.value.cpu())
            z = st.advance(z, g, i)
            zs.append(z.clone())
    finally:
        hook.remove()
    return dict(zs=zs, outs=outs, guided=guided, trunks=trunks)


@torch.no_grad()
def analyze_policy(bench, st: Stepper, ref: dict, policy) -> dict:
    """Teacher-forced per-step errors and free-running accumulated error of one policy."""
    from opensora_duca.cache import apply_cache, remove_cache

    n = bench.num_steps
    cfg = policy if not isinstance(policy, str) else dict(type=policy)
    mgr = apply_cache(bench.model, cfg)
    hook = TrunkHook(bench.model)
    try:
        out_e, g_e, tr_e = [], [], []
        with mgr.session(n):
            for i in range(n):
                v, g = st.model_out(ref["zs"][i], i)
                out_e.append(_mean(rel_l2(v.float().cpu(), ref["outs"][i])))
                g_e.append(_mean(rel_l2(g.float().cpu(), ref["guided"][i])))
                tr_e.append(_mean(rel_l2(hook.value.cpu(), ref["trunks"][i])))
            stats = mgr.stats()
        z_e = []
        with mgr.session(n):
            z = bench.z0.clone()
            for i in range(n):
                _, g = st.model_out(z, i)
                z = st.advance(z, g, i)
                z_e.append(_mean(rel_l2(z.float().cpu(), ref["zs"][i + 1].float().cpu())))
        fid = bm.fidelity(z.float().cpu(), ref["zs"][-1].float().cpu())
    finally:
        hook.remove()
        remove_cache(bench.model)
    return dict(step_labels=stats["step_labels"], steps_by_kind=stats["steps_by_kind"],
                flops_ratio=float(stats["flops_ratio"]), policy_config=stats["policy"],
                per_step=dict(output_rel_l2=out_e, guided_rel_l2=g_e, trunk_rel_l2=tr_e),
                per_step_mean_by_kind=_by_kind(stats["step_labels"], out_e),
                free_running=dict(z_rel_l2=z_e, final_rel_l2=z_e[-1], final_psnr=fid["psnr"],
                                  final_ssim=fid["ssim"]))


def _by_kind(labels, errs):
    d: Dict[str, List[float]] = {}
    for lab, e in zip(labels, errs):
        d.setdefault(lab, []).append(e)
    return {k: _mean(v) for k, v in d.items()}


# ---------------------------------------------------------------------------- claim test
def _scripted_policy_cls():
    from opensora_duca.cache.policies import CachePolicy, DuCa

    class Scripted(CachePolicy):
        """Plays a fixed list of step plans; scorer and selection settings as DuCa's defaults."""

        name = "scripted"

        def __init__(self, plans, label):
            d = DuCa()
            self.scorer, self.staleness_bonus = d.scorer, d.staleness_bonus
            self.cfg_shared_selection, self.seed = d.cfg_shared_selection, d.seed
            self.stored_dtype = None
            self.plans, self.label = list(plans), label

        def plan(self, step, num_steps, timesteps):
            from opensora_duca.cache.plan import FULL_STEP
            return self.plans[step] if step < len(self.plans) else FULL_STEP

        def reuses(self, kind):
            return True

        def skips_trunk(self):
            return any(p.skip_trunk for p in self.plans)

        def describe(self):
            return {"type": self.name, "label": self.label,
                    "plans": [p.label for p in self.plans]}

    return Scripted


def claim_variants(num_steps: int) -> Dict[str, list]:
    """Scripted 3-step plans: a full step, then the two steps under test."""
    from opensora_duca.cache.plan import FULL_STEP, TRUNK_SKIP, Action, Kind, StepPlan
    from opensora_duca.cache.policies import DuCa

    MLP = Kind.MLP

    duca = DuCa()
    cons = next(p for p in (duca.plan(s, num_steps, [500.0] * (s + 1)) for s in range(3, 9))
                if p.label == "conservative" and p.actions[MLP] == Action.PARTIAL)
    half = StepPlan(actions=dict(cons.actions), ratios={MLP: cons.ratios[MLP] / 2},
                    label="conservative (half ratio)")
    reuse = StepPlan(actions={k: Action.REUSE for k in cons.actions}, label="reuse")
    return {"A+C": [FULL_STEP, TRUNK_SKIP, cons],
            "R+C": [FULL_STEP, reuse, cons],
            "C+C same cost": [FULL_STEP, half, half],
            "C+C": [FULL_STEP, cons, cons],
            "C+A": [FULL_STEP, cons, TRUNK_SKIP],
            "A+A": [FULL_STEP, TRUNK_SKIP, TRUNK_SKIP],
            "F+F": [FULL_STEP, FULL_STEP, FULL_STEP]}


@torch.no_grad()
def claim_test(bench, st: Stepper, ref: dict, starts: List[int]) -> dict:
    from opensora_duca.cache import apply_cache, remove_cache
    from opensora_duca.cache import flops as fl

    Scripted = _scripted_policy_cls()
    variants = claim_variants(bench.num_steps)
    per = {name: {"err": {}, "err_update": {}} for name in variants}
    cost = {}
    for s in starts:
        z_ref_end = ref["zs"][s + 3].double().cpu()
        moved = (z_ref_end - ref["zs"][s + 1].double().cpu()).flatten(1).norm(dim=1)
        for name, plans in variants.items():
            mgr = apply_cache(bench.model, Scripted(plans, name))
            try:
                with mgr.session(3):
                    z = ref["zs"][s].clone()
                    for k in range(3):
                        _, g = st.model_out(z, s + k)
                        z = st.advance(z, g, s + k)
                    stats = mgr.stats()
            finally:
                remove_cache(bench.model)
            d = (z.double().cpu() - z_ref_end).flatten(1).norm(dim=1)
            per[name]["err"][s] = (d / z_ref_end.flatten(1).norm(dim=1)).tolist()
            per[name]["err_update"][s] = (d / moved.clamp_min(1e-30)).tolist()
            full = stats["flops_uncached"] / 3
            cost[name] = (stats["flops_actual"] - full) / full if full else None
    out = {"starts": starts, "variants": {}}
    for name in variants:
        errs = [e for s in starts for e in per[name]["err"][s]]
        upd = [e for s in starts for e in per[name]["err_update"][s]]
        out["variants"][name] = dict(
            plans=[p.label for p in variants[name][1:]],
            cost_full_step_equivalents=cost[name],
            err_mean=_mean(errs), err_std=statistics.pstdev(errs) if errs else None,
            err_update_mean=_mean(upd),
            err_by_start={str(s): _mean(per[name]["err"][s]) for s in starts})
    a = [e for s in starts for e in per["A+C"]["err"][s]]
    c = [e for s in starts for e in per["C+C same cost"]["err"][s]]
    c2 = [e for s in starts for e in per["C+C"]["err"][s]]
    wins = sum(x < y for x, y in zip(a, c))
    out["comparison"] = dict(
        a_plus_c_beats_c_plus_c_same_cost=f"{wins}/{len(a)}",
        a_plus_c_beats_c_plus_c=f"{sum(x < y for x, y in zip(a, c2))}/{len(a)}",
        lower_error_same_cost="A+C" if _mean(a) < _mean(c) else "C+C same cost",
        ratio_a_plus_c_over_c_plus_c_same_cost=_mean(a) / _mean(c) if _mean(c) else None)
    return out


# ---------------------------------------------------------------------------------- plots
def make_plots(report: dict, out_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    pols = report["policies"]
    n = report["num_steps"]
    markers = {"full": "o", "full (cross-attn reused)": "s", "conservative": "^",
               "aggressive": "x", "reuse": "v", "broadcast": "D"}

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, title in ((axes[0], "output_rel_l2", "model output"),
                           (axes[1], "trunk_rel_l2", "trunk output (temporal_blocks[-1])")):
        for name, r in pols.items():
            if name == "none":
                continue
            errs = r["per_step"][key]
            line, = ax.plot(range(n), [e if e > 0 else float("nan") for e in errs], lw=1,
                            label=name)
            for lab in set(r["step_labels"]):
                idx = [i for i, lb in enumerate(r["step_labels"]) if lb == lab and errs[i] > 0]
                if idx:
                    ax.scatter(idx, [errs[i] for i in idx], marker=markers.get(lab, "."), s=18,
                               color=line.get_color())
        ax.set_yscale("log")
        ax.set_xlabel("step (fed the uncached z_t)")
        ax.set_ylabel("relative L2 error vs uncached")
        ax.set_title(f"per-step error: {title}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("markers: o full, s full (cross reused), ^ conservative, x aggressive, "
                 "v reuse, D broadcast; full steps have 0 error (not shown)", fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(out_dir, "per_step_error.png")))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, r in pols.items():
        if name == "none":
            continue
        ax.plot(range(1, n + 1), [e if e > 0 else float("nan")
                                  for e in r["free_running"]["z_rel_l2"]],
                label=f"{name} (final {r['free_running']['final_rel_l2']:.2e})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("relative L2 error of z_t vs uncached")
    ax.set_title("free-running accumulated error", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(out_dir, "accumulated_error.png")))
    plt.close(fig)

    claim = report.get("claim_test")
    if claim:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        names = [k for k in claim["variants"] if k != "F+F"]
        starts = claim["starts"]
        w = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            v = claim["variants"][name]
            ax.bar([i + j * w for i in range(len(starts))],
                   [v["err_by_start"][str(s)] for s in starts], width=w,
                   label=f"{name} ({v['cost_full_step_equivalents']:.2f} full steps)")
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(starts))])
        ax.set_xticklabels([str(s) for s in starts])
        ax.set_xlabel("start step s (fully computed)")
        ax.set_ylabel("rel. L2 error of z after s+2 vs uncached")
        ax.set_yscale("log")
        ax.set_title("claim test: two cached steps after a full step", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        paths.append(_save(fig, os.path.join(out_dir, "claim_test.png")))
        plt.close(fig)
    return paths


def _save(fig, path):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".partial.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------- main
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None, help="inference config (or use --preset)")
    p.add_argument("--preset", default=None, help=f"one of {list(bm.PRESETS)}")
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


def parse_starts(text: Optional[str], n: int) -> List[int]:
    if text is None:
        starts = list(range(3, n - 2, 3))
        if not starts and n >= 3:
            starts = [0]
        return starts
    try:
        starts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        starts = None
    if not starts or any(s < 0 or s + 3 > n for s in starts):
        raise ValueError(f"--starts={text!r} is not accepted; accepted: comma-separated ints s "
                         f"with 0 <= s <= num_steps - 3 = {n - 3}")
    return sorted(set(starts))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if (args.config is None) == (args.preset is None):
        raise SystemExit("give exactly one of CONFIG (an inference config) or --preset "
                         f"(one of {list(bm.PRESETS)})")
    if args.samples < 1:
        raise ValueError(f"--samples={args.samples!r} is not accepted; accepted: an int >= 1")
    policies = bm.parse_policies(args.policies)
    ns = argparse.Namespace(config=args.config, preset=args.preset, device=args.device,
                            dtype=args.dtype, steps=args.steps, batch=args.samples,
                            seed=args.seed, init_seed=args.init_seed, ckpt_path=args.ckpt_path,
                            tiny=args.tiny, latent=args.latent, hidden=args.hidden,
                            depth=args.depth, allow_cpu=args.allow_cpu)
    bench = bm.build_bench(ns)
    n = bench.num_steps
    starts = [] if args.no_claim else parse_starts(args.starts, n)
    st = Stepper(bench)
    t0 = time.perf_counter()
    ref = reference(bench, st)
    report = {"model": bench.name, "setup": bench.info, "device": bm._device_name(bench.device),
              "torch": torch.__version__, "num_steps": n, "samples": args.samples,
              "metric": "relative L2 ||x - ref|| / ||ref|| per sample (per CFG row for model "
                        "outputs), mean over samples",
              "policies": {}}
    for p in policies:
        report["policies"][p] = analyze_policy(bench, st, ref, p)
        r = report["policies"][p]
        print(f"{p:<11s} per-step output error mean {_mean(r['per_step']['output_rel_l2']):.3e}"
              f" | by kind {({k: f'{v:.2e}' for k, v in r['per_step_mean_by_kind'].items()})}"
              f" | free-running final {r['free_running']['final_rel_l2']:.3e} "
              f"(PSNR {r['free_running']['final_psnr']:.2f} dB)", flush=True)
    if starts:
        report["claim_test"] = claim_test(bench, st, ref, starts)
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
    report["plots"] = make_plots(report, args.out)
    from opensora_duca.eval.fidelity import write_json_atomic
    path = os.path.join(args.out, "error_analysis.json")
    write_json_atomic(report, path)
    print(f"[json] {path}\n[plots] {', '.join(report['plots'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
