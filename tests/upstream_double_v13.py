"""A small STDiT3 with Open-Sora 1.3's *structure* (one process), to check the cache plugin on
an upstream 1.3 object. Written from docs/stdit3.md ("Open-Sora 1.3"); imports nothing from
``opensora_duca``. Where upstream's structure differs from this project's STDiT3 it follows
upstream:

- the block class is named ``STDiT3Block`` and is called
  ``block(x, y, t, y_lens, x_mask, t0, T, S, H, W, scale, mask_index=..., y_null=...)``;
- the temporal window attention is called with the grid ``[B, H, W, T, C]``, pads it, cuts the
  windows into the batch (window-major, sample-minor) and applies ``qkv`` to the 5-D windows
  ``[windows * B, kH, kW, kT, C]``; its non-fused attention passes the map through
  ``attn_drop``, as upstream's does;
- the spatial attention is called ``attn(x, H=H, W=W, scale=scale)``;
- with ``mask_index`` the block calls its cross-attention twice (given frames with ``y_null``,
  the others with ``y``); captions are packed with per-sample lengths as in 1.2.

The state dict has this project's names except ``rope.freqs`` (a non-persistent buffer here):
:func:`load_state_dict_v13` maps one onto it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from upstream_double import (
    CaptionEmbedder,
    FinalLayer,
    Mlp,
    MultiHeadCrossAttention,
    RMSNorm,
    TimestepEmbedder,
    pos_embed_2d,
    softmax_attention,
    t2i_modulate,
    t_mask_select,
)


def rotate_3d(x, freqs, k1, k2, scale):
    """x [.., k1*k2*k3, d] ordered (k1, k2, k3): thirds turned by the k3, k1/scale, k2/scale
    positions."""
    k3 = x.shape[-2] // (k1 * k2)
    r = x.shape[-1] // 3
    grid = torch.meshgrid(torch.arange(k1), torch.arange(k2), torch.arange(k3), indexing="ij")
    pos = [grid[2].float(), grid[0].float() / scale, grid[1].float() / scale]
    out = []
    for j, p in enumerate(pos):
        ang = torch.outer(p.reshape(-1), freqs.float()).repeat_interleave(2, dim=-1)
        part = x[..., j * r:(j + 1) * r]
        pairs = part.unflatten(-1, (-1, 2))
        turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        out.append(part * ang.cos().to(x.dtype) + turned * ang.sin().to(x.dtype))
    return torch.cat(out, dim=-1)


class Attention13(nn.Module):
    def __init__(self, dim, num_heads, freqs=None, kernel_size=None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(0.0)
        self.freqs, self.kernel_size = freqs, kernel_size

    def forward(self, x, scale=None, H=None, W=None):
        bias, dims = None, None
        if self.kernel_size is not None:  # x [B, H, W, T, C] -> windows in the batch
            B, *dims, C = x.shape
            ks = [d if k == -1 else k for k, d in zip(self.kernel_size, dims)]
            pad = [(-d) % k for d, k in zip(dims, ks)]
            real = F.pad(torch.ones(1, *dims, dtype=torch.bool), (0, pad[2], 0, pad[1], 0,
                                                                    pad[0]))
            x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
            n = [s // k for s, k in zip(x.shape[1:4], ks)]
            x = x.view(B, n[0], ks[0], n[1], ks[1], n[2], ks[2], C).permute(
                1, 3, 5, 0, 2, 4, 6, 7).reshape(-1, *ks, C)  # 5-D windows, as upstream
            real = real.view(1, n[0], ks[0], n[1], ks[1], n[2], ks[2]).permute(
                1, 3, 5, 0, 2, 4, 6).reshape(-1, 1, 1, math.prod(ks))
            bias = real.repeat_interleave(B, dim=0)
        Bq, C, N = x.shape[0], x.shape[-1], math.prod(x.shape[1:-1])
        q, k, v = self.qkv(x).view(Bq, N, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.kernel_size is not None:
            q, k = (rotate_3d(a, self.freqs, ks[0], ks[1], scale) for a in (q, k))
        elif self.freqs is not None:
            q, k = (rotate_3d(a, self.freqs, H, W, scale) for a in (q, k))
        out = self.proj(softmax_attention(q, k, v, self.head_dim ** -0.5, bias, self.attn_drop)
                        .transpose(1, 2).reshape(Bq, N, C))
        if self.kernel_size is None:
            return out
        out = out.view(n[0], n[1], n[2], B, ks[0], ks[1], ks[2], C).permute(
            3, 0, 4, 1, 5, 2, 6, 7).reshape(B, n[0] * ks[0], n[1] * ks[1], n[2] * ks[2], C)
        return out[:, :dims[0], :dims[1], :dims[2]]


class STDiT3Block(nn.Module):
    def __init__(self, hidden, num_heads, temporal=False, freqs=None, kernel_size=None):
        super().__init__()
        self.temporal, self.hidden_size = temporal, hidden
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.attn = Attention13(hidden, num_heads, freqs, kernel_size if temporal else None)
        self.cross_attn = MultiHeadCrossAttention(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden, 4 * hidden)
        self.drop_path = nn.Identity()
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden) / hidden ** 0.5)

    def forward(self, x, y, t, mask=None, x_mask=None, t0=None, T=None, S=None, H=None, W=None,
                scale=None, mask_index=None, y_null=None):
        B, N, C = x.shape
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = (self.scale_shift_table[None]
                                            + t.reshape(B, 6, -1)).chunk(6, dim=1)
        if x_mask is not None:
            sh_a0, sc_a0, g_a0, sh_m0, sc_m0, g_m0 = (self.scale_shift_table[None]
                                                      + t0.reshape(B, 6, -1)).chunk(6, dim=1)
        h = t2i_modulate(self.norm1(x), sh_a, sc_a)
        if x_mask is not None:
            h = t_mask_select(x_mask, h, t2i_modulate(self.norm1(x), sh_a0, sc_a0), T, S)
        if self.temporal:
            h = rearrange(h, "B (T H W) C -> B H W T C", T=T, H=H, W=W)
            h = rearrange(self.attn(h, scale=scale), "B H W T C -> B (T H W) C", T=T, H=H, W=W)
        else:
            h = rearrange(h, "B (T S) C -> (B T) S C", T=T, S=S)
            h = rearrange(self.attn(h, H=H, W=W, scale=scale), "(B T) S C -> B (T S) C", T=T,
                          S=S)
        gated = g_a * h
        if x_mask is not None:
            gated = t_mask_select(x_mask, gated, g_a0 * h, T, S)
        x = x + gated
        if mask_index:
            x = rearrange(x, "B (T S) C -> B T S C", T=T, S=S).clone()
            rest = [i for i in range(T) if i not in mask_index]
            for frames, cap in ((list(mask_index), y_null), (rest, y)):
                part = rearrange(x[:, frames], "B T S C -> B (T S) C")
                x[:, frames] = (part + self.cross_attn(part, cap, mask)).view(B, len(frames),
                                                                             S, C)
            x = rearrange(x, "B T S C -> B (T S) C")
        else:
            x = x + self.cross_attn(x, y, mask)
        h = t2i_modulate(self.norm2(x), sh_m, sc_m)
        if x_mask is not None:
            h = t_mask_select(x_mask, h, t2i_modulate(self.norm2(x), sh_m0, sc_m0), T, S)
        h = self.mlp(h)
        gated = g_m * h
        if x_mask is not None:
            gated = t_mask_select(x_mask, gated, g_m0 * h, T, S)
        return x + gated


def _patch_embed(cin, hidden, patch):
    m = nn.Module()
    m.proj = nn.Conv3d(cin, hidden, patch, stride=patch)
    return m


class UpstreamShapedSTDiT3V13(nn.Module):
    def __init__(self, in_channels=4, hidden_size=48, depth=2, num_heads=4,
                 caption_channels=32, model_max_length=8, input_sq_size=512,
                 kernel_size=(2, 4, -1), use_spatial_rope=True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, 2 * in_channels
        self.patch_size, self.hidden_size = (1, 2, 2), hidden_size
        self.input_sq_size = input_sq_size
        r = hidden_size // num_heads // 3
        self.register_buffer("rope_freqs", 10000.0 ** (-torch.arange(0, r, 2).float() / r),
                             persistent=False)
        self.x_embedder = _patch_embed(in_channels, hidden_size, self.patch_size)
        self.x_embedder_cond = _patch_embed(in_channels, hidden_size, self.patch_size)
        self.x_embedder_cond_mask = _patch_embed(in_channels, hidden_size, self.patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.fps_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length)
        spatial_rope = self.rope_freqs if use_spatial_rope else None
        self.spatial_blocks = nn.ModuleList(
            [STDiT3Block(hidden_size, num_heads, freqs=spatial_rope) for _ in range(depth)])
        self.temporal_blocks = nn.ModuleList(
            [STDiT3Block(hidden_size, num_heads, temporal=True, freqs=self.rope_freqs,
                         kernel_size=kernel_size) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, 4, self.out_channels)

    def encode_text(self, y, mask):
        y = self.y_embedder(y)
        if mask.shape[0] != y.shape[0]:
            mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
        keep = mask.reshape(y.shape[0], -1) != 0
        return y.squeeze(1)[keep].view(1, -1, self.hidden_size), keep.sum(dim=1).tolist()

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None,
                cond=None, cond_mask=None, mask_index=None, y_null=None, **kwargs):
        B, _, Tx, Hx, Wx = x.shape
        T, H, W = Tx, -(-Hx // 2), -(-Wx // 2)
        S = H * W
        scale = (height[0].item() * width[0].item()) ** 0.5 / self.input_sq_size
        pos = pos_embed_2d(H, W, self.hidden_size, scale, round(S ** 0.5), x.dtype, x.device)
        fps_emb = self.fps_embedder(fps.reshape(-1), x.dtype).expand(B, -1)
        t = self.t_embedder(timestep, x.dtype) + fps_emb
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(torch.zeros_like(timestep), x.dtype) + fps_emb
            t0_mlp = self.t_block(t0)
        y, y_lens = self.encode_text(y, mask)
        if y_null is not None:
            y_null = self.encode_text(y_null, mask)[0]

        def embed(mod, v):
            v = F.pad(v, (0, 2 * W - Wx, 0, 2 * H - Hx))
            return mod.proj(v).flatten(2).transpose(1, 2)
        h = embed(self.x_embedder, x)
        if mask_index is not None:
            h = h + embed(self.x_embedder_cond, cond) + embed(self.x_embedder_cond_mask,
                                                               cond_mask)
        h = (h.view(B, T, S, -1) + pos[:, None]).reshape(B, T * S, -1)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            for blk in (spatial, temporal):
                h = blk(h, y, t_mlp, y_lens, x_mask, t0_mlp, T, S, H, W, scale,
                        mask_index=mask_index, y_null=y_null)
        h = self.final_layer(h, t, x_mask, t0, T, S)
        h = rearrange(h, "B (Nt Nh Nw) (Hp Wp C) -> B C Nt (Nh Hp) (Nw Wp)", Nt=T, Nh=H, Nw=W,
                      Hp=2, Wp=2, C=self.out_channels)
        return h[:, :, :Tx, :Hx, :Wx].float()


def load_state_dict_v13(double: UpstreamShapedSTDiT3V13, state_dict: dict) -> None:
    """Load a state dict of opensora_duca's 1.3 STDiT3 (its ``rope.freqs`` must equal the
    double's)."""
    sd = dict(state_dict)
    if not torch.allclose(sd.pop("rope.freqs").double(), double.rope_freqs.double(), rtol=1e-6):
        raise ValueError("rope.freqs differ from the double's rotary frequencies")
    double.load_state_dict(sd, strict=True)
