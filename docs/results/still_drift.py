"""Which step kind makes DuCa's still shapes drift. Run from the repository root:
``python docs/results/still_drift.py`` (writes docs/results/still_drift.json, resumable).

The still captions of the caption set (21) x seeds 0 and 1, scored by the frontier machinery
(``opensora_duca.eval.frontier``): judge motion accuracy (the share of still clips that stay
still), agreement with the uncached verdict, PSNR against the uncached frames. Besides DuCa: ToCa
(DuCa with a conservative step where DuCa has an aggressive one), DuCa with only its aggressive
steps (its conservative positions computed in full), DuCa with only its conservative steps (its
aggressive positions computed in full), DuCa with forecasting, FORA.
"""
import torch
from mmengine.config import Config

from opensora_duca.data.synthetic import caption_set
from opensora_duca.eval.frontier import run_frontier
from opensora_duca.pipeline import build_from_config

F, C, A = "full", "conservative", "aggressive"


def tables(short, cross):
    return dict(spatial_attn=short, temporal_attn=short, mlp=short, cross_attn=cross)


POINTS = [
    ("DuCa", dict(type="DuCa")),
    ("ToCa (DuCa without aggressive steps)", dict(type="ToCa")),
    ("DuCa, aggressive steps only",
     dict(type="DuCa", tables=tables([F, F, A], [F, F, A, F, F, A]))),
    ("DuCa, conservative steps only",
     dict(type="DuCa", tables=tables([F, C, F], [F, C, F, C, C, F]))),
    ("DuCa+forecast", dict(type="DuCa", forecast=dict(order=1))),
    ("FORA", dict(type="FORA")),
]

if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg = Config.fromfile("configs/demo/inference.py")
    cfg.cache = None
    pipe = build_from_config(cfg, device="cpu")
    still = [c for c in caption_set() if c.endswith("staying still")]
    res = run_frontier(pipe, POINTS, still, [0, 1], "docs/results/still_drift.json",
                       progress=False,
                       meta=dict(config="configs/demo/inference.py", subset="still captions"))
    print(len(still), "still captions; uncached motion ok", res["reference"]["motion"])
    for p in res["points"]:
        print(f"{p['family']:40s} motion {p['motion']:.3f} agree {p['agreement']:.3f} "
              f"psnr {p['psnr']:.2f} flops {p['flops_ratio']:.2f}")
