"""The DuCa paper's error study on a bench (see ``tools/analyze_error.py --help``): teacher-forced
per-step errors, free-running accumulated error, and the aggressive-vs-conservative claim test."""
from __future__ import annotations

import os
import statistics
from typing import Dict, List, Optional

import torch

from ..utils.atomic import save_figure
from .benches import Bench
from .measure import fidelity


# ------------------------------------------------------------------------- sampling steps
class Stepper:
    """One rflow step at a time, exactly as ``RFlow.sample`` does it (CFG batch [z, z] with
    captions [y, y_null], v = v_u + cfg (v_c - v_u), z += v (t_i - t_{i+1}) / num_timesteps)."""

    def __init__(self, bench: Bench):
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


def mean(v):
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
    from ..cache import apply_cache, remove_cache

    n = bench.num_steps
    cfg = policy if not isinstance(policy, str) else dict(type=policy)
    mgr = apply_cache(bench.model, cfg)
    hook = TrunkHook(bench.model)
    try:
        out_e, g_e, tr_e = [], [], []
        with mgr.session(n):
            for i in range(n):
                v, g = st.model_out(ref["zs"][i], i)
                out_e.append(mean(rel_l2(v.float().cpu(), ref["outs"][i])))
                g_e.append(mean(rel_l2(g.float().cpu(), ref["guided"][i])))
                tr_e.append(mean(rel_l2(hook.value.cpu(), ref["trunks"][i])))
            stats = mgr.stats()
        z_e = []
        with mgr.session(n):
            z = bench.z0.clone()
            for i in range(n):
                _, g = st.model_out(z, i)
                z = st.advance(z, g, i)
                z_e.append(mean(rel_l2(z.float().cpu(), ref["zs"][i + 1].float().cpu())))
        fid = fidelity(z.float().cpu(), ref["zs"][-1].float().cpu())
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
    return {k: mean(v) for k, v in d.items()}


# ---------------------------------------------------------------------------- claim test
def _scripted_policy_cls():
    from ..cache.policies import CachePolicy, DuCa

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
            from ..cache.plan import FULL_STEP
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
    from ..cache.plan import FULL_STEP, TRUNK_SKIP, Action, Kind, StepPlan
    from ..cache.policies import DuCa

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
    from ..cache import apply_cache, remove_cache

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
            err_mean=mean(errs), err_std=statistics.pstdev(errs) if errs else None,
            err_update_mean=mean(upd),
            err_by_start={str(s): mean(per[name]["err"][s]) for s in starts})
    a = [e for s in starts for e in per["A+C"]["err"][s]]
    c = [e for s in starts for e in per["C+C same cost"]["err"][s]]
    c2 = [e for s in starts for e in per["C+C"]["err"][s]]
    wins = sum(x < y for x, y in zip(a, c))
    out["comparison"] = dict(
        a_plus_c_beats_c_plus_c_same_cost=f"{wins}/{len(a)}",
        a_plus_c_beats_c_plus_c=f"{sum(x < y for x, y in zip(a, c2))}/{len(a)}",
        lower_error_same_cost="A+C" if mean(a) < mean(c) else "C+C same cost",
        ratio_a_plus_c_over_c_plus_c_same_cost=mean(a) / mean(c) if mean(c) else None)
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
    return save_figure(path, fig, dpi=110)



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
