"""The benchmark report as a markdown table and a speed-vs-fidelity plot."""
from __future__ import annotations

from ..utils.atomic import save_figure


def _fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def markdown_table(report: dict) -> str:
    frames = any("psnr_frames" in r for r in report["results"])
    head = ["policy", "median s", "speedup", "min s", "speedup (min)", "CPU-time speedup",
            "FLOPs ratio", "PSNR lat",
            "SSIM lat"]
    if frames:
        head += ["PSNR frames", "SSIM frames"]
    head += ["peak cache MiB", "peak mem MiB", "bookkeeping ms (%)", "syncs/run", "steps"]
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
                  _fmt(r.get("syncs_per_run"), "d"), kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_kind_table(report: dict) -> str:
    """Time per step kind against the ideal (the kind's FLOPs share of an uncached step)."""
    head = ["policy", "step kind", "steps/run", "median ms", "FLOPs share", "ideal ms",
            "time / ideal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        for kind, k in r.get("step_kinds", {}).items():
            lines.append("| " + " | ".join([
                r["policy"], kind, str(k["steps"]), f"{k['median_s'] * 1e3:.1f}",
                _fmt(k["flops_share"], ".3f"),
                _fmt(None if k["ideal_s"] is None else k["ideal_s"] * 1e3, ".1f"),
                _fmt(k["vs_ideal"], ".2f")]) + " |")
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
    try:
        save_figure(path, fig, dpi=110)
    finally:
        plt.close(fig)
