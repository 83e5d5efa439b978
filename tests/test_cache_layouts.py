"""The STDiT3 layout adapter's window mapping (cache/layouts/stdit3.py) against an independent
reference of upstream Open-Sora 1.3's windowing, written here from its description: pad each
axis on the right to a multiple of the window (plus the shift-window's (left, right) extra),
then split along H, then W, then T and concatenate the pieces along the batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opensora_duca.cache.layouts.stdit3 import (
    attention_token_scores,
    block_args_rows,
    real_window_rows,
    window_geometry,
    windows_to_grid,
)


def reference_windows(grid: torch.Tensor, kernel, extra=None):
    """grid [B, D1, D2, D3, F] -> [windows * B, k1, k2, k3, F] by padding, split and cat."""
    dims = grid.shape[1:4]
    ks = [d if k == -1 else k for k, d in zip(kernel, dims)]
    extra = extra or (0,) * 6
    pads = []
    for i in reversed(range(3)):
        left = extra[2 * i]
        right = (ks[i] - dims[i] % ks[i]) % ks[i] + extra[2 * i + 1]
        pads += [left, right]
    x = F.pad(grid, [0, 0] + pads)
    pieces = [x]
    for axis, k in zip((1, 2, 3), ks):
        pieces = [q for p in pieces for q in p.split(k, dim=axis)]
    return torch.cat(pieces, 0)


CASES = [((2, 7, 3), (2, 4, -1), None), ((4, 8, 5), (2, 4, -1), None),
         ((3, 5, 4), (2, 2, 3), None), ((4, 6, 3), (2, 4, -1), (1, 1, 2, 2, 0, 0))]


@pytest.mark.parametrize("dims,kernel,extra", CASES)
def test_windows_map_back_to_the_grid(dims, kernel, extra):
    b = 3
    grid = torch.arange(b * dims[0] * dims[1] * dims[2], dtype=torch.float32).view(b, *dims, 1)
    grid = grid + 1  # padding is 0, every real token is > 0
    win = reference_windows(grid, kernel, extra)[..., 0]           # [windows * B, k1, k2, k3]
    geo = window_geometry(kernel, dims, extra)
    assert torch.equal(windows_to_grid(win, b, geo), grid[..., 0])
    real = real_window_rows(b, geo)
    assert torch.equal(real, win.reshape(win.shape[0], -1) > 0)


class _WindowAttn(torch.nn.Module):
    def __init__(self, kernel_size, extra=None):
        super().__init__()
        self.kernel_size, self.extra_pad_on_dims = kernel_size, extra


@pytest.mark.parametrize("dims,kernel,extra", CASES)
def test_window_scores_are_in_block_token_order(dims, kernel, extra):
    """Per-row values of the windows -> [B, T*H*W] (the block's (T, H, W) token order)."""
    b = 2
    h, w, t = dims
    token = torch.arange(b * t * h * w, dtype=torch.float32).view(b, t, h, w) + 1
    grid = token.permute(0, 2, 3, 1)[..., None]                    # [B, H, W, T, 1]
    rows = reference_windows(grid, kernel, extra)[..., 0]
    attn_in = torch.zeros(b, h, w, t, 8)
    got = attention_token_scores(rows, attn_in, _WindowAttn(kernel, extra), b, True)
    assert torch.equal(got, token.reshape(b, -1))
    # upstream's sequence-parallel path runs qkv on the grid itself: rows shaped like it
    got = attention_token_scores(grid[..., 0], attn_in, _WindowAttn(kernel, extra), b, True)
    assert torch.equal(got, token.reshape(b, -1))


def test_rows_that_fit_no_layout_are_a_clear_error():
    attn_in = torch.zeros(2, 3, 5, 4, 8)
    with pytest.raises(RuntimeError, match="neither one per token nor its windows"):
        attention_token_scores(torch.zeros(7, 9), attn_in, _WindowAttn((2, 4, -1)), 2, True)


def test_block_args_rows_cuts_packed_and_batched_arguments():
    b, c = 3, 4
    lens = [2, 3, 1]
    y = torch.arange(sum(lens) * c, dtype=torch.float32).view(1, sum(lens), c)
    args = dict(x=torch.randn(b, 6, c), y=y, t=torch.randn(b, 6 * c), mask=lens,
                x_mask=torch.tensor([[True, False]] * b), t0=None, T=2, S=3, scale=1.5,
                mask_index=[0], y_null=y + 100)
    out = block_args_rows(args, torch.tensor([0, 2]), b)
    assert torch.equal(out["x"], args["x"][[0, 2]])
    assert torch.equal(out["t"], args["t"][[0, 2]])
    assert out["mask"] == [2, 1]
    assert torch.equal(out["y"], torch.cat([y[:, 0:2], y[:, 5:6]], 1))
    assert torch.equal(out["y_null"], torch.cat([y[:, 0:2], y[:, 5:6]], 1) + 100)
    assert out["T"] == 2 and out["scale"] == 1.5 and out["mask_index"] == [0]
    ours = dict(x=torch.randn(b, 6, c), y=torch.randn(b, 5, c), mask=torch.ones(b, 5).bool())
    out = block_args_rows(ours, torch.tensor([1]), b)
    assert torch.equal(out["y"], ours["y"][[1]]) and out["mask"].shape == (1, 5)
