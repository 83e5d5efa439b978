"""The STDiT3 block layout (Open-Sora 1.2 / 1.3), as the cache reads it from this project's
model and from upstream Open-Sora's objects alike.

Two things live here:

* **Token scores from a self-attention** (:func:`attention_token_scores`). The scorers read a
  per-row quantity of a block's self-attention: the value-vector norms of the ``qkv``
  projection output (``vnorm``) or the attention each key receives (``attention``). Where that
  row sits in the block's token order [B, T, S] depends on how the attention module laid its
  input out: spatial ``[(B T), S]``, temporal ``[(B S), T]`` (Open-Sora 1.2, and this project's
  1.3 window attention, which windows after the projection), or upstream 1.3's temporal window
  attention, which is called with the grid ``[B, H, W, T, C]`` and applies ``qkv`` to the padded
  windows, cut into the batch: ``[n_H * n_W * n_T * B, k_H, k_W, k_T, C]`` (window-major,
  sample-minor, each window ordered (h, w, t); padding on the right of each axis, plus the
  shift-window's extra padding where ``extra_pad_on_dims`` is set). The rows are mapped back to
  the token grid and padded positions dropped.
* **The rows of one batch sample in a block's arguments** (:func:`block_args_rows`), so a block
  can run on a sub-batch: tensors with one row per sample are indexed, captions packed as
  upstream packs them (``y [1, sum(y_lens), C]`` with ``mask = y_lens``) are cut per sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class WindowGeometry:
    """How a grid ``dims`` (D1, D2, D3) is cut into windows of ``kernel``: ``left`` / ``right``
    padding per axis and ``counts`` windows per axis."""

    dims: Tuple[int, int, int]
    kernel: Tuple[int, int, int]
    left: Tuple[int, int, int]
    right: Tuple[int, int, int]

    @property
    def padded(self) -> Tuple[int, int, int]:
        return tuple(d + a + b for d, a, b in zip(self.dims, self.left, self.right))

    @property
    def counts(self) -> Tuple[int, int, int]:
        return tuple(p // k for p, k in zip(self.padded, self.kernel))

    @property
    def rows_per_sample(self) -> int:
        """Window rows (qkv batch entries x window tokens) per sample."""
        return math.prod(self.padded)


def window_geometry(kernel_size: Sequence[int], dims: Sequence[int],
                    extra_pad: Optional[Sequence[int]] = None) -> WindowGeometry:
    """Upstream 1.3's windowing of a grid ``dims``: -1 in ``kernel_size`` is the whole axis;
    each axis is right-padded to a multiple of its window, and ``extra_pad`` (upstream's
    ``extra_pad_on_dims``: per axis (left, right) extra, the shift-window option) is added."""
    kernel = tuple(int(d) if k == -1 else int(k) for k, d in zip(kernel_size, dims))
    extra = tuple(extra_pad) if extra_pad is not None else (0,) * 6
    left, right = [], []
    for i, (d, k) in enumerate(zip(dims, kernel)):
        left.append(int(extra[2 * i]))
        right.append((k - d % k) % k + int(extra[2 * i + 1]))
    return WindowGeometry(tuple(int(d) for d in dims), kernel, tuple(left), tuple(right))


def windows_to_grid(rows: torch.Tensor, batch: int, geo: WindowGeometry) -> torch.Tensor:
    """Per-row values of the windows ``[n1*n2*n3*B, k1, k2, k3]`` (or ``[.., k1*k2*k3]``) ->
    ``[B, D1, D2, D3]``, padding dropped."""
    n1, n2, n3 = geo.counts
    k1, k2, k3 = geo.kernel
    g = rows.reshape(n1, n2, n3, batch, k1, k2, k3).permute(3, 0, 4, 1, 5, 2, 6)
    g = g.reshape(batch, *geo.padded)
    for axis, (a, d) in enumerate(zip(geo.left, geo.dims)):
        g = g.narrow(axis + 1, a, d)
    return g


def real_window_rows(batch: int, geo: WindowGeometry, device=None) -> torch.Tensor:
    """bool ``[n1*n2*n3*B, k1*k2*k3]``: False where a window row is padding."""
    n1, n2, n3 = geo.counts
    k1, k2, k3 = geo.kernel
    real = torch.zeros(geo.padded, dtype=torch.bool, device=device)
    real[tuple(slice(a, a + d) for a, d in zip(geo.left, geo.dims))] = True
    real = real.view(n1, k1, n2, k2, n3, k3).permute(0, 2, 4, 1, 3, 5)
    return real.reshape(n1 * n2 * n3, 1, k1 * k2 * k3).expand(-1, batch, -1).reshape(
        -1, k1 * k2 * k3)


def _window_input(attn: torch.nn.Module, attn_in: torch.Tensor) -> Optional[WindowGeometry]:
    """The geometry of an upstream-style window attention called with ``[B, H, W, T, C]``."""
    kernel = getattr(attn, "kernel_size", None)
    if attn_in.dim() != 5 or kernel is None:
        return None
    return window_geometry(kernel, attn_in.shape[1:4], getattr(attn, "extra_pad_on_dims", None))


def attention_token_scores(per_row: torch.Tensor, attn_in: torch.Tensor, attn: torch.nn.Module,
                           batch: int, temporal: bool, name: str = "block",
                           others: str = "'random', 'norm' or 'similarity'") -> torch.Tensor:
    """A per-row score of a self-attention (one value per row its ``qkv`` projection or its
    attention map saw) -> ``[B, T*S]`` in the block's token order.

    ``attn_in`` is what the attention module was called with: ``[(B T), S, C]`` (spatial),
    ``[(B S), T, C]`` (temporal) or ``[B, H, W, T, C]`` (upstream 1.3's window attention, whose
    rows are either the grid's tokens in that order, under upstream's sequence parallelism, or
    its padded windows)."""
    tokens = attn_in.numel() // attn_in.shape[-1]
    if attn_in.dim() == 5:
        b, h, w, t = attn_in.shape[:4]
        if tuple(per_row.shape) == tuple(attn_in.shape[:4]):  # rows are the grid's tokens
            grid = per_row
        else:
            geo = _window_input(attn, attn_in)
            if geo is None or per_row.numel() != batch * geo.rows_per_sample:
                raise RuntimeError(
                    f"{name}: the self-attention was called with a grid "
                    f"{tuple(attn_in.shape)} and its qkv / attention map has {per_row.numel()} "
                    f"rows, which is neither one per token nor its windows (kernel_size="
                    f"{getattr(attn, 'kernel_size', None)!r}); choose scorer {others}")
            grid = windows_to_grid(per_row, b, geo)
        return grid.permute(0, 3, 1, 2).reshape(b, -1)  # [B, H, W, T] -> [B, T*H*W]
    if per_row.numel() != tokens or attn_in.dim() != 3:
        raise RuntimeError(
            f"{name}: the self-attention's qkv / attention map has {per_row.numel()} rows for "
            f"an input {tuple(attn_in.shape)} ({tokens} tokens); the scores need one row per "
            f"token; choose scorer {others}")
    r = per_row.reshape(attn_in.shape[:2])
    if temporal:  # [(B S), T] -> [B, T, S]
        return r.view(batch, -1, r.shape[1]).transpose(1, 2).reshape(batch, -1)
    return r.reshape(batch, -1)  # [(B T), S] -> [B, T*S]


def received_per_row(amap: torch.Tensor, attn_in: torch.Tensor, attn: torch.nn.Module,
                     batch: int) -> torch.Tensor:
    """Attention each key receives, summed over heads and (real) queries: an attention map
    ``[B', h, n, n]`` -> ``[B', n]``. Queries at padded window positions are left out (their
    rows exist only because the grid was padded)."""
    amap = amap.float()
    geo = _window_input(attn, attn_in)
    if geo is not None and any(geo.left + geo.right):
        real = real_window_rows(batch, geo, amap.device)
        if real.shape == (amap.shape[0], amap.shape[2]):
            amap = amap * real[:, None, :, None]
    return amap.sum(dim=(1, 2))


def _per_sample(value, batch: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch


def block_args_rows(args: dict, rows: torch.Tensor, batch: int) -> dict:
    """A block's arguments by name (``x, y, t, mask, x_mask, t0, ..., y_null``) for the samples
    ``rows`` (a 1-D long tensor on any device) of a batch of ``batch``.

    Tensors with one row per sample are indexed; ``mask`` given as upstream's per-sample caption
    lengths (a list) is cut, and the captions it describes (``y``, ``y_null`` packed
    ``[1, sum(lengths), C]``) are cut to those samples' segments; everything else (``T``, ``S``,
    ``H``, ``W``, ``scale``, ``mask_index``) is shared by all samples."""
    keep = rows.tolist()
    out = dict(args)
    lens = args.get("mask")
    packed = isinstance(lens, (list, tuple)) and len(lens) == batch
    if packed:
        starts = [sum(lens[:i]) for i in range(batch)]
        out["mask"] = type(lens)(lens[i] for i in keep)
    for key, value in args.items():
        if key == "mask" and packed:
            continue
        if packed and key in ("y", "y_null") and torch.is_tensor(value) and \
                value.shape[0] == 1 and value.shape[1] == sum(lens):
            out[key] = torch.cat([value[:, starts[i]:starts[i] + lens[i]] for i in keep], 1)
        elif _per_sample(value, batch):
            out[key] = value.index_select(0, rows.to(value.device))
        elif torch.is_tensor(value) and value.dim() > 0 and key not in ("scale",) and \
                value.shape[0] not in (1,):
            raise RuntimeError(f"block argument {key!r} has {value.shape[0]} rows for a batch "
                               f"of {batch}; the cache cannot run this block on a sub-batch")
    return out
