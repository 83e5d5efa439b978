"""TeaCache calibration: fit, on the model in use, the polynomial that maps the measured change
of the first block's modulated input to the change of the model output.

A few uncached runs record, per step i >= 1, x_i = relative L1 change of block 0's modulated
input from step i-1 (measured exactly as the TeaCache policy measures it, rank-invariant) and
y_i = relative L1 change of the model output; a least-squares polynomial fit y ~ p(x) of the
chosen degree gives the coefficients (highest degree first) that ``TeaCache(calibration=...)``
reads from the JSON file this writes.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from .manager import apply_cache, remove_cache


def fit_polynomial(xs: Sequence[float], ys: Sequence[float], degree: int) -> Dict[str, object]:
    """Least-squares fit (numpy.polyfit) -> coefficients (highest degree first), RMSE, n."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"calibration samples: xs and ys must be equal-length lists, got "
                         f"{x.shape} and {y.shape}")
    if not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree={degree!r} is invalid; accepted: an integer >= 0")
    if len(x) <= degree:
        raise ValueError(f"calibration needs more than degree={degree} samples, got {len(x)}; "
                         f"add runs or steps")
    coeffs = np.polyfit(x, y, degree)
    rmse = float(np.sqrt(np.mean((np.polyval(coeffs, x) - y) ** 2)))
    return {"coefficients": [float(c) for c in coeffs], "degree": degree, "rmse": rmse,
            "samples": int(len(x))}


@torch.no_grad()
def collect_changes(pipe, prompts: Sequence[str], seeds: Sequence[int]) -> Dict[str, List[float]]:
    """Uncached runs of ``pipe`` (one per seed, all prompts in one batch): per step >= 1 and
    clip (its rows of the CFG batch), the modulated-input change (x) and the model-output
    change (y)."""
    if pipe.cache_manager is not None:
        remove_cache(pipe.model)
        pipe.cache_manager = None
    xs: List[float] = []
    ys: List[float] = []
    outs: List[torch.Tensor] = []
    hook = pipe.model.register_forward_hook(lambda mod, a, out: outs.append(out.detach()))
    try:
        for seed in seeds:
            # threshold 0: every step is computed, and the change is measured as TeaCache does
            mgr = apply_cache(pipe.model, dict(type="TeaCache", threshold=0.0))
            pipe.cache_manager = mgr
            try:
                outs.clear()
                pipe.generate(list(prompts), seeds=[seed] * len(prompts))
                changes, groups = mgr.stats()["changes"], mgr.stats()["groups"]
            finally:
                remove_cache(pipe.model)
                pipe.cache_manager = None
            for i in range(1, len(outs)):  # one point per decision group (clip) and step
                prev, now = outs[i - 1].double(), outs[i].double()
                for change, rows in zip(changes[i], groups):
                    if change is None:
                        continue
                    a, b = now[rows], prev[rows]
                    xs.append(float(change))
                    ys.append(float((a - b).abs().sum() / b.abs().sum().clamp_min(1e-300)))
    finally:
        hook.remove()
    return {"x": xs, "y": ys}
