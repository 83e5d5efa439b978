"""Analytic FLOPs of the STDiT3 trunk, per module, and of a cached run relative to uncached.

Convention: 2 FLOPs per multiply-add of every matrix product in the transformer blocks — the
linear layers (qkv, proj, q/kv of cross-attention, fc1, fc2) and the two attention products
(q k^T and attn v) — for the whole classifier-free-guidance batch. LayerNorm, modulation,
softmax, element-wise ops, the embedders and the final layer are left out (< 1% at
STDiT3-XL/2 sizes). A module run on a subset of k tokens costs its per-token part for k tokens
(cross-attention's key/value projection of the caption is paid whenever it runs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..models.window import window_attention_flops
from .plan import Action, Kind


@dataclass(frozen=True)
class TrunkShape:
    batch: int        # B (the CFG batch counts twice)
    frames: int       # T (latent frames after patching)
    spatial: int      # S = H * W tokens per frame
    hidden: int       # C
    depth: int        # number of spatial (= temporal) blocks
    caption_len: int  # L caption tokens per sample
    mlp_hidden: int   # fc1 width
    temporal: bool = True  # temporal blocks exist (not Open-Sora 1.3's skip_temporal)
    # Open-Sora 1.3 window attention of the temporal blocks: its kernel and the latent grid
    temporal_kernel: Optional[Tuple[int, ...]] = None
    rows: int = 0     # H
    width: int = 0    # W
    single_depth: int = 0  # single-stream blocks after the depth double-stream ones (MMDiT)

    @property
    def tokens(self) -> int:
        return self.frames * self.spatial

    @property
    def per_pair(self) -> tuple:
        """Module kinds of one spatial (+ temporal) block pair, with how often each runs."""
        if not self.temporal:
            return (Kind.SPATIAL_ATTN, 1), (Kind.CROSS_ATTN, 1), (Kind.MLP, 1)
        return (Kind.SPATIAL_ATTN, 1), (Kind.TEMPORAL_ATTN, 1), (Kind.CROSS_ATTN, 2), (Kind.MLP, 2)


def module_flops(shape: TrunkShape, kind: str, tokens: int | None = None) -> float:
    """FLOPs of one module of one block on ``tokens`` query tokens per sample (default: all)."""
    n = shape.tokens if tokens is None else tokens
    b, c, L = shape.batch, shape.hidden, shape.caption_len
    if kind == Kind.SPATIAL_ATTN:
        return b * (2 * n * c * 3 * c + 4 * n * shape.spatial * c + 2 * n * c * c)
    if kind == Kind.TEMPORAL_ATTN:
        if shape.temporal_kernel is not None:
            return window_attention_flops(b, shape.frames, shape.rows, shape.width, c,
                                          shape.temporal_kernel, tokens=n)
        return b * (2 * n * c * 3 * c + 4 * n * shape.frames * c + 2 * n * c * c)
    if kind == Kind.CROSS_ATTN:
        return b * (2 * n * c * c + 2 * L * c * 2 * c + 4 * n * L * c + 2 * n * c * c)
    if kind == Kind.MLP:
        return b * (2 * n * c * shape.mlp_hidden * 2)
    raise ValueError(f"unknown module kind {kind!r}")


def full_step_flops(shape: TrunkShape) -> float:
    per_pair = sum(n * module_flops(shape, kind) for kind, n in shape.per_pair)
    return shape.depth * per_pair


def step_flops(shape: TrunkShape, plan, partial_tokens: dict | None = None) -> float:
    """FLOPs of one step under ``plan``; ``partial_tokens[kind]`` = tokens per sample a PARTIAL
    module recomputes (default: round(ratio * N))."""
    if plan.skip_trunk:
        return 0.0
    if plan.residual_from is not None:  # blocks before it computed in full, the rest skipped
        k = plan.residual_from
        spatial, temporal = ((k + 1) // 2, k // 2) if shape.temporal else (k, 0)
        per_block = module_flops(shape, Kind.CROSS_ATTN) + module_flops(shape, Kind.MLP)
        before = (spatial * (module_flops(shape, Kind.SPATIAL_ATTN) + per_block)
                  + temporal * (module_flops(shape, Kind.TEMPORAL_ATTN) + per_block))
        # per-sample decisions: the computed rows pay the rest (FLOPs scale with the batch)
        rest = full_step_flops(shape) - before
        return before + rest * len(plan.computed_rows) / shape.batch
    # rows computing every block beside the plan (VerifiedDuCa's fallback)
    total = full_step_flops(shape) / shape.depth * len(plan.computed_rows) / shape.batch
    for kind, count in shape.per_pair:
        act = plan.actions[kind]
        if act == Action.FULL:
            total += count * module_flops(shape, kind)
        elif act == Action.PARTIAL:
            k = (partial_tokens or {}).get(kind)
            if k is None:
                k = round(plan.ratios[kind] * shape.tokens)
            total += count * module_flops(shape, kind, k)
    return shape.depth * total


def run_flops_ratio(policy, num_steps: int, shape: TrunkShape, rows: int, width: int,
                    timesteps=None) -> dict:
    """Analytic uncached/actual FLOPs of a whole run of ``policy`` at ``shape`` (latent grid
    ``rows`` x ``width`` per frame), without running a model. Partial modules count the
    tokens the row-quota selection actually picks. ``timesteps`` default to rflow's uniform
    (1 - i/n) * 1000 (only PAB looks at them)."""
    from .selection import TokenGrid, selected_per_sample

    grid = TokenGrid(frames=shape.frames, rows=rows, width=width, local_rows=rows, row_offset=0)
    if timesteps is None:
        timesteps = [(1 - i / num_steps) * 1000 for i in range(num_steps)]
    policy.validate_run(num_steps)
    timesteps = [float(t) for t in timesteps]
    actual, labels = 0.0, []
    for s in range(num_steps):
        plan = policy.plan(s, num_steps, timesteps[:s + 1])
        part = {k: selected_per_sample(plan.ratios[k], grid)
                for k, a in plan.actions.items() if a == Action.PARTIAL}
        actual += step_flops(shape, plan, part)
        labels.append(str(plan.label))
    full = num_steps * full_step_flops(shape)
    return {"flops_ratio": full / actual if actual else float("inf"),
            "full_step_equivalents": actual / full_step_flops(shape), "labels": labels}
