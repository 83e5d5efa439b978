"""Open-Sora 1.3's 3-D window attention: token grids cut into windows and put back.

A grid ``[B, D1, D2, D3, F]`` (latent rows, columns, frames) is right-padded on each axis to a
multiple of the kernel ``(k1, k2, k3)`` (an entry -1 means the whole axis) and cut into windows
of ``k1*k2*k3`` tokens, ordered (k1, k2, k3) inside a window. Attention runs inside each
window; padded tokens are kept out of the keys. See docs/stdit3.md ("Open-Sora 1.3").
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def check_kernel_size(kernel_size) -> Optional[Tuple[int, int, int]]:
    """Validate a model's ``kernel_size``: None, or three ints, each >= 1 or -1 (whole axis)."""
    if kernel_size is None:
        return None
    ok = isinstance(kernel_size, (tuple, list)) and len(kernel_size) == 3 and all(
        isinstance(k, int) and not isinstance(k, bool) and (k >= 1 or k == -1)
        for k in kernel_size)
    if not ok:
        raise ValueError(f"STDiT3 kernel_size={kernel_size!r}: accepted: None or three ints "
                         f"(rows, columns, frames), each >= 1 or -1 for the whole axis, "
                         f"e.g. (8, 8, -1)")
    return tuple(kernel_size)


def resolve_kernel(kernel_size: Sequence[int], dims: Sequence[int]) -> Tuple[int, ...]:
    """The window extent on each axis of a grid of size ``dims`` (-1 -> the whole axis)."""
    return tuple(d if k == -1 else k for k, d in zip(kernel_size, dims))


def to_windows(x: torch.Tensor, kernel: Sequence[int]):
    """[B, D1, D2, D3, F] -> (windows [B * n_windows, k1*k2*k3, F], real [.., k1*k2*k3] bool
    (False = padding) or None when nothing was padded)."""
    b, d1, d2, d3, f = x.shape
    k1, k2, k3 = kernel
    pads = [(-d) % k for d, k in zip((d1, d2, d3), kernel)]
    real = None
    if any(pads):
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        ones = torch.ones(1, d1, d2, d3, 1, dtype=torch.bool, device=x.device)
        grid = F.pad(ones, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]), value=False)
        real = _cut(grid, kernel).squeeze(-1).repeat(b, 1)
    return _cut(x, kernel), real


def _cut(x: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    b, p1, p2, p3, f = x.shape
    k1, k2, k3 = kernel
    x = x.view(b, p1 // k1, k1, p2 // k2, k2, p3 // k3, k3, f)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, k1 * k2 * k3, f)


def from_windows(w: torch.Tensor, dims: Sequence[int], kernel: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`to_windows`: [B * n_windows, k1*k2*k3, F] -> [B, D1, D2, D3, F]."""
    d1, d2, d3 = dims
    k1, k2, k3 = kernel
    n1, n2, n3 = -(-d1 // k1), -(-d2 // k2), -(-d3 // k3)
    f = w.shape[-1]
    x = w.view(-1, n1, n2, n3, k1, k2, k3, f).permute(0, 1, 4, 2, 5, 3, 6, 7)
    x = x.reshape(-1, n1 * k1, n2 * k2, n3 * k3, f)
    return x[:, :d1, :d2, :d3]


def window_attention_flops(batch: int, frames: int, rows: int, width: int, hidden: int,
                           kernel_size: Sequence[int], tokens: Optional[int] = None) -> float:
    """FLOPs of one windowed self-attention module (2 per multiply-add), in the convention of
    ``cache.flops.module_flops``: the qkv and output projections on ``tokens`` query tokens per
    sample (default all, frames*rows*width) plus q k^T and attn v over every window, padded
    positions included (they are computed and discarded)."""
    n = frames * rows * width if tokens is None else tokens
    kernel = resolve_kernel(kernel_size, (rows, width, frames))
    padded = math.prod(-(-d // k) * k for d, k in zip((rows, width, frames), kernel))
    window = math.prod(kernel)
    return batch * (2 * n * hidden * 3 * hidden + 2 * n * hidden * hidden
                    + 4 * padded * window * hidden)
