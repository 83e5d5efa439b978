"""Token scores and shard-invariant top-k selection.

Tokens are laid out frame-major [B, T, rows, W] on each rank (rows = the latent rows this rank
holds; sequence parallelism shards whole rows). To make the selection independent of the
number of ranks, every *global* latent row r of every frame gets a fixed quota
q(r) = floor((r + 1) K / H) - floor(r K / H) with K = round(ratio * H * W) tokens per frame, and
a row's tokens compete only with each other. Scores are normalised per row (L2), so the
staleness bonus weighs the same on any rank. Random scores are drawn for the global token grid
and sliced. Padding rows (beyond H) get quota 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TokenGrid:
    """Where this rank's tokens sit in the global latent grid."""

    frames: int      # T
    rows: int        # H, real global rows
    width: int       # W
    local_rows: int  # rows held here (may include padding rows beyond H)
    row_offset: int  # global index of the first local row

    @property
    def local_tokens(self) -> int:
        return self.frames * self.local_rows * self.width


def local_grid(grid_key: tuple, n_local: int) -> TokenGrid:
    """The token grid of a rank holding ``n_local`` tokens per sample: ``grid_key`` is (T, H,
    W, ranks, rank); sequence parallelism shards whole latent rows."""
    T, H, W, _, r = grid_key
    s_local = n_local // T
    if s_local % W:
        raise RuntimeError(f"token selection needs whole latent rows per rank; this rank holds "
                           f"{s_local} tokens per frame with row width {W}")
    rows = s_local // W
    return TokenGrid(frames=T, rows=H, width=W, local_rows=rows, row_offset=r * rows)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, C] at idx [B, k] -> [B, k, C]."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def frame_quota(ratio: float, grid: TokenGrid) -> int:
    return int(round(ratio * grid.rows * grid.width))


def _quotas(ratio: float, grid: TokenGrid) -> list:
    """Quota of every local row (0 for padding rows), as host ints."""
    k, h = frame_quota(ratio, grid), grid.rows
    return [(r + 1) * k // h - r * k // h if r < h else 0
            for r in range(grid.row_offset, grid.row_offset + grid.local_rows)]


def row_quotas(ratio: float, grid: TokenGrid, device=None) -> torch.Tensor:
    """Quota of every local row (zeros for padding rows)."""
    return torch.tensor(_quotas(ratio, grid), dtype=torch.long, device=device)


def selected_per_sample(ratio: float, grid: TokenGrid) -> int:
    """Tokens per sample selected on this rank."""
    return sum(_quotas(ratio, grid)) * grid.frames


def normalise_rows(score: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """L2-normalise [B, N] scores within each latent row."""
    s = score.float().view(score.shape[0], grid.frames, grid.local_rows, grid.width)
    s = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return s.reshape(score.shape[0], -1)


_PLANS: dict = {}


def _selection_plan(ratio: float, grid: TokenGrid, device):
    """(kmax, token offsets [T, rows], flat positions to keep) for a ratio and grid, built once
    from host ints (no tensor is read) and kept on ``device``, so selecting never waits for
    the device."""
    key = (float(ratio), grid.frames, grid.rows, grid.width, grid.local_rows, grid.row_offset,
           str(device))
    plan = _PLANS.get(key)
    if plan is None:
        q = _quotas(ratio, grid)
        kmax = max(q, default=0)
        # row r keeps its first q[r] of kmax candidates
        keep = torch.tensor([r * kmax + j for r, qr in enumerate(q) for j in range(qr)],
                            dtype=torch.long)
        flat = (torch.arange(grid.frames)[:, None] * (grid.local_rows * kmax) + keep[None])
        base = (torch.arange(grid.frames)[:, None] * grid.local_rows
                + torch.arange(grid.local_rows)[None]) * grid.width
        if len(_PLANS) > 256:
            _PLANS.clear()
        plan = _PLANS[key] = (kmax, base.to(device), flat.reshape(-1).to(device))
    return plan


def select_tokens(score: torch.Tensor, ratio: float, grid: TokenGrid,
                  cfg_shared: bool = False) -> torch.Tensor:
    """Indices [B, k] (local token positions) of the highest scores under the row quotas."""
    b = score.shape[0]
    kmax, base, flat = _selection_plan(ratio, grid, score.device)
    if kmax == 0:
        return torch.zeros(b, 0, dtype=torch.long, device=score.device)
    s = score.view(b, grid.frames, grid.local_rows, grid.width)
    if cfg_shared:
        if b % 2:
            raise ValueError(f"cfg_shared_selection needs an even (CFG) batch, got batch {b}")
        half = s[: b // 2] + s[b // 2:]
        s = torch.cat([half, half], 0)
    top = s.topk(kmax, dim=-1, sorted=True).indices + base[None, :, :, None]  # [B, T, rows, kmax]
    return top.reshape(b, -1).index_select(1, flat)


def random_scores(batch: int, grid: TokenGrid, seed: int, step: int, block: int,
                  device, batch_offset: int = 0, batch_total: Optional[int] = None
                  ) -> torch.Tensor:
    """Uniform scores drawn for the global grid [B, T, H, W] and sliced to the local rows.

    Under CFG parallelism a process holds samples ``batch_offset`` .. ``+ batch`` of a batch of
    ``batch_total``: the draw is made for the whole batch and sliced, so every sample gets the
    numbers it gets in a single-process run."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step * 10_007 + block) % (2 ** 63))
    total = batch if batch_total is None else batch_total
    full = torch.rand(total, grid.frames, grid.rows, grid.width, generator=g)
    full = full[batch_offset:batch_offset + batch]
    lo, hi = grid.row_offset, grid.row_offset + grid.local_rows
    local = full[:, :, lo:min(hi, grid.rows)]
    if hi > grid.rows:  # padding rows
        pad = torch.zeros(batch, grid.frames, hi - max(lo, grid.rows), grid.width)
        local = torch.cat([local, pad], 2)
    local = local.reshape(batch, -1)
    if torch.device(device).type == "cuda":  # a pageable copy would wait for the device
        return local.pin_memory().to(device, non_blocking=True)
    return local.to(device)


def vnorm_rows(qkv_out: torch.Tensor, heads: int) -> torch.Tensor:
    """r = sum_h (1 - ||v^h||_2) for every row of a qkv projection output [..., 3C] -> [...]
    (rows in the order the attention laid them out; ``cache.layouts`` maps them to tokens)."""
    c = qkv_out.shape[-1] // 3
    v = qkv_out[..., 2 * c:].float().unflatten(-1, (heads, c // heads))
    return (1.0 - v.norm(dim=-1)).sum(-1)
