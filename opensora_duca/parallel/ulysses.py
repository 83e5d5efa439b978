"""Ulysses (all-to-all) sequence parallelism for joint [txt; img] attention (the MMDiT).

Layout on P ranks of a forward with Lt text tokens and a T x H x W grid of image tokens in
(t h w) order:

- image tokens are sharded by whole latent rows of every frame, as STDiT3's
  :func:`opensora_duca.parallel.split_rows`: rank r holds rows [r*Hl, (r+1)*Hl) of each frame,
  Hl = ceil(H / P) (:func:`opensora_duca.parallel.rows_per_rank`); rows beyond H are zero
  padding. Locally the image tokens are in (t, local row, w) order, T*Hl*W of them;
- text tokens are sharded in contiguous chunks of ceil(Lt / P) (the last ones padded);
- a rank's local sequence is [its text chunk; its image rows], n = ceil(Lt/P) + T*Hl*W tokens.

For attention, :meth:`UlyssesPlan.to_global` sends each rank's q/k/v heads group r to rank r
(all-to-all: heads scattered, tokens gathered), then puts the gathered tokens in the global
[txt; img] order with padding dropped, so attention (and the rotary tables of the full
sequence) is exactly the single-process one; :meth:`UlyssesPlan.to_local` is the inverse.
Inference only: the collectives do not carry gradients.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import all_to_all, gather_rows, group_rank, group_size, rows_per_rank, split_rows


class SequenceParallelState:
    """Holds the plan of the forward in progress (None between forwards, so no process group
    is referenced outside a forward)."""

    def __init__(self):
        self.plan: Optional[UlyssesPlan] = None


class UlyssesPlan:
    """Token layout and exchanges of one forward (see the module docstring).

    Attributes: ``group``, ``world`` (P), ``rank``, ``grid`` (T, H, W), ``txt_len`` (Lt),
    ``rows`` (Hl, latent rows per rank), ``txt_chunk`` (text tokens per rank, padded),
    ``local_img_len`` (T*Hl*W), ``local_len`` (text chunk + local image tokens), ``index``
    (for each global [txt; img] token its position in the gathered sequence of P local
    sequences), ``local_txt_index`` / ``local_img_index`` (the global text / image token index
    of each local token, -1 for padding)."""

    def __init__(self, group, txt_len: int, grid: Sequence[int], device=None):
        self.group = group
        self.world = p = group_size(group)
        self.rank = r = group_rank(group)
        t, h, w = (int(v) for v in grid)
        self.grid = (t, h, w)
        self.txt_len = int(txt_len)
        self.rows = hl = rows_per_rank(h, p)
        self.txt_chunk = ct = -(-self.txt_len // p)
        self.local_img_len = t * hl * w
        self.local_len = n = ct + self.local_img_len

        kw = dict(device=device, dtype=torch.long)
        pos = torch.arange(self.txt_len, **kw)
        idx_txt = (pos // ct) * n + pos % ct if ct else pos
        tt = torch.arange(t, **kw)[:, None, None]
        hh = torch.arange(h, **kw)[None, :, None]
        ww = torch.arange(w, **kw)[None, None, :]
        idx_img = (hh // hl) * n + ct + tt * (hl * w) + (hh % hl) * w + ww
        self.index = torch.cat((idx_txt, idx_img.reshape(-1)))

        local_txt = torch.arange(r * ct, (r + 1) * ct, **kw)
        self.local_txt_index = torch.where(local_txt < self.txt_len, local_txt,
                                           torch.full_like(local_txt, -1))
        rows = torch.arange(r * hl, (r + 1) * hl, **kw)[None, :, None]
        local_img = tt * (h * w) + rows * w + ww
        self.local_img_index = torch.where(rows < h, local_img,
                                           torch.full_like(local_img, -1)).reshape(-1)

    # ------------------------------------------------------------- token sharding
    def shard_img(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T*H*W, C] (t h w order) -> this rank's rows [B, T*Hl*W, C]."""
        b, _, c = x.shape
        t, h, w = self.grid
        return split_rows(x.reshape(b, t, h * w, c), self.group, h, w).reshape(b, -1, c)

    def gather_img(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`shard_img` on every rank: [B, T*Hl*W, C] -> [B, T*H*W, C]."""
        b, _, c = x.shape
        t, h, w = self.grid
        return gather_rows(x.reshape(b, t, -1, c), self.group, h, w).reshape(b, t * h * w, c)

    def shard_txt(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Lt, C] -> this rank's chunk [B, ceil(Lt/P), C] (zero padded)."""
        if self.world == 1:
            return x
        ct = self.txt_chunk
        pad = ct * self.world - x.shape[1]
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x[:, self.rank * ct:(self.rank + 1) * ct]

    # ------------------------------------------------------------- attention exchange
    def to_global(self, *xs: torch.Tensor):
        """Local tensors [B, H, n, D] -> [B, H/P, Lt + T*H*W, D] each, global [txt; img]
        order, padding dropped (one all-to-all for all of them)."""
        stacked = torch.stack(xs)
        full = all_to_all(stacked, self.group, scatter_dim=2, gather_dim=3)
        return full.index_select(3, self.index).unbind(0)

    def to_local(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_global` for one tensor: [B, H/P, Lt + T*H*W, D] ->
        [B, H, n, D] (padding positions zero)."""
        b, hp, _, d = y.shape
        full = y.new_zeros(b, hp, self.world * self.local_len, d)
        full.index_copy_(2, self.index, y)
        return all_to_all(full, self.group, scatter_dim=2, gather_dim=1)


__all__ = ["SequenceParallelState", "UlyssesPlan"]
