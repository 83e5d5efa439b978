"""The frontier table of docs/frontier.md: the sweep on the evaluation seeds beside the second run
on a seed used for nothing else. Run from the repository root (prints markdown):
``python docs/results/frontier_table.py docs/results/frontier.json
docs/results/frontier_seed20.json``."""
import json
import sys

from opensora_duca.eval.frontier import _label, point_key


def main(main_path, second_path):
    with open(main_path, encoding="utf-8") as f:
        first = json.load(f)
    with open(second_path, encoding="utf-8") as f:
        second = json.load(f)
    other = {point_key(p["config"]): p for p in second["points"]}
    s1, s2 = (", ".join(str(x) for x in r["meta"]["seeds"]) for r in (first, second))
    n1, n2 = first["reference"]["n"], second["reference"]["n"]
    print(f"| family | settings | FLOPs ratio | CPU speedup | PSNR dB (seeds {s1}) | PSNR dB "
          f"(seeds {s2}) | SSIM | judge ok | agrees with uncached ({n1} / {n2} clips) | "
          f"checks failed | stored MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    r1, r2 = first["reference"], second["reference"]
    print(f"| none | - | 1.00x | 1.00x | inf | inf | 1.0000 | {r1['ok']:.1%} / {r2['ok']:.1%} "
          f"| 100% / 100% | - | 0 |")
    for p in first["points"]:
        q = other.get(point_key(p["config"]))
        v = p.get("verify")
        checks = f"{v['failed']}/{v['checked']}" if v else "-"
        if p["config"].get("type") == "VerifiedDuCa" and p["config"].get("verify_threshold") \
                is None:
            checks = "- (no threshold)"
        second_psnr = f"{q['psnr']:.2f}" if q else "not run"
        second_agree = f"{q['agreement']:.1%}" if q else "-"
        second_ok = f" / {q['ok']:.1%}" if q else ""
        print(f"| {p['family']} | {_label(p['config'])} | {p['flops_ratio']:.2f}x "
              f"| {p['speedup_cpu']:.2f}x | {p['psnr']:.2f} | {second_psnr} | {p['ssim']:.4f} "
              f"| {p['ok']:.1%}{second_ok} | {p['agreement']:.1%} / {second_agree} | {checks} "
              f"| {p['peak_stored_bytes'] / 2 ** 20:.1f} |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(" ".join(__doc__.splitlines()[2:4]))
    main(sys.argv[1], sys.argv[2])
