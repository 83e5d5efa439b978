"""A small STDiT3 with Open-Sora 1.2.0's *structure*, to check that the cache plugin works on an
upstream model object and not only on opensora_duca's own STDiT3.

Written from the equations in docs/stdit3.md; it imports nothing from ``opensora_duca``. Where
upstream's structure differs from this project's STDiT3, the double follows upstream:

- captions are packed into ONE sequence ``[1, sum(L_i), C]`` of the valid tokens of all samples,
  and the ``mask`` a block receives is the list of per-sample valid lengths (``y_lens``);
  cross-attention uses a block-diagonal mask over (query sample, caption sample);
- under sequence parallelism the spatial blocks use separate classes,
  :class:`SeqParallelAttention` (all-to-all that gathers the sequence and scatters the heads,
  attention, all-to-all back) and :class:`SeqParallelCrossAttention` (queries all-to-all'ed
  the same way; each rank attends with its share of the heads);
- the model forward splits the tokens along S into P contiguous chunks (S % P == 0 required,
  no padding) and all-gathers them after the last block;
- the block is ``forward(x, y, t, mask=None, x_mask=None, t0=None, T=None, S=None)`` with
  submodules ``norm1, attn (qkv, q_norm, k_norm, proj, num_heads), cross_attn, norm2,
  mlp (fc1, fc2), scale_shift_table, drop_path`` and upstream's op order: modulate, then pick
  per frame (``t_mask_select``), rearrange, attend, rearrange back, gate, pick again;
- the final layer's x_mask form: masked-off frames take LN of the already modulated tokens,
  modulated with the t0 shift/scale.

One deliberate departure: 1.2.0's sequence-parallel cross-attention folds the batch into the
sequence before its all-to-all, which pairs tokens with the wrong caption when B > 1; this one
keeps the batch axis apart, so one and two ranks agree.

State-dict names are upstream's except ``rope.freqs`` (the double keeps its rotary frequencies
in a non-persistent buffer); :func:`load_stdit3_state_dict` maps a state dict of
opensora_duca's STDiT3 onto it.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


# ------------------------------------------------------------------ parallel helpers
def sp_group():
    """WORLD when torch.distributed runs with more than one rank, else None (one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def sp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def exchange(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """All-to-all: chunk r of ``x`` along scatter_dim goes to rank r; received chunks are
    concatenated along gather_dim in rank order."""
    p = sp_size(group)
    send = torch.stack([c.contiguous() for c in x.chunk(p, dim=scatter_dim)])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(list(recv), dim=gather_dim)


# ------------------------------------------------------------------------ layers
def t2i_modulate(x, shift, scale):
    return x * (1 + scale) + shift


def t_mask_select(x_mask, x, masked_x, T, S):
    """Per frame: ``x`` where x_mask [B, T] is True, ``masked_x`` where it is False."""
    x = rearrange(x, "B (T S) C -> B T S C", T=T, S=S)
    masked_x = rearrange(masked_x, "B (T S) C -> B T S C", T=T, S=S)
    return rearrange(torch.where(x_mask[:, :, None, None], x, masked_x), "B T S C -> B (T S) C")


def sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] of t * max_period^(-i / (dim/2)), in float32 as upstream."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    ang = t.float()[:, None] * freqs.to(t.device)[None]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_interleaved(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_2i, x_2i+1) at sequence position p (axis -2) by p * freqs[i]."""
    pos = torch.arange(x.shape[-2], dtype=torch.float32, device=x.device)
    ang = torch.outer(pos, freqs.float()).repeat_interleave(2, dim=-1).to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * ang.cos() + turned * ang.sin()


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def softmax_attention(q, k, v, scale, bias=None, drop=None):
    """q [.., n, d], k/v [.., m, d]; softmax in float32 (upstream's non-flash path). Upstream
    passes the map through the attention's ``attn_drop`` module (``drop``) before ``@ v``."""
    s = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf"))
    s = s.float().softmax(dim=-1).to(q.dtype)
    return (s if drop is None else drop(s)) @ v


def block_diagonal_attention(q, k, v, q_lens, kv_lens):
    """q [1, sum(q_lens), h, d], k/v [1, sum(kv_lens), h, d]: query segment i attends to key
    segment i only."""
    qid = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
    kid = torch.repeat_interleave(torch.arange(len(kv_lens)), torch.tensor(kv_lens))
    allowed = (qid[:, None] == kid[None]).to(q.device)
    out = softmax_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            q.shape[-1] ** -0.5, allowed)
    return out.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, rope=None):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(0.0)
        self.rope = rope is not None
        self.rotary_emb = rope

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = self.rotary_emb(q), self.rotary_emb(k)
        out = softmax_attention(q, k, v, self.scale, drop=self.attn_drop)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class SeqParallelAttention(Attention):
    """Spatial self-attention on this rank's S/P tokens: gather the sequence, scatter heads."""

    def forward(self, x):
        B, N, C = x.shape  # N: local tokens
        group = sp_group()
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        if sp_size(group) > 1:
            qkv = exchange(qkv, group, scatter_dim=3, gather_dim=1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, h/P, N*P, d]
        q, k = self.q_norm(q), self.k_norm(k)
        out = softmax_attention(q, k, v, self.scale, drop=self.attn_drop).transpose(1, 2)
        if sp_size(group) > 1:
            out = exchange(out, group, scatter_dim=1, gather_dim=2)
        return self.proj(out.reshape(B, N, C))


class MultiHeadCrossAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x, cond, mask=None):
        """x [B, N, C]; cond the packed captions [1, sum(y_lens), C]; mask = y_lens."""
        B, N, C = x.shape
        q = self.q_linear(x).view(1, -1, self.num_heads, self.head_dim)
        k, v = self.kv_linear(cond).view(1, -1, 2, self.num_heads, self.head_dim).unbind(2)
        out = block_diagonal_attention(q, k, v, [N] * B, list(mask))
        return self.proj(out.reshape(B, N, C))


class SeqParallelCrossAttention(MultiHeadCrossAttention):
    """Cross-attention of spatial blocks under sequence parallelism: the queries of all ranks
    are gathered per sample with the heads scattered; each rank uses its share of kv heads."""

    def forward(self, x, cond, mask=None):
        group = sp_group()
        p = sp_size(group)
        B, n_local, C = x.shape
        hp = self.num_heads // p
        q = self.q_linear(x).view(B, n_local, self.num_heads, self.head_dim)
        kv = self.kv_linear(cond).view(1, -1, 2, self.num_heads, self.head_dim)
        if p > 1:
            q = exchange(q, group, scatter_dim=2, gather_dim=1)  # [B, N, h/P, d]
            r = dist.get_rank(group)
            kv = kv[:, :, :, r * hp:(r + 1) * hp]
        n = q.shape[1]
        k, v = kv.unbind(2)
        out = block_diagonal_attention(q.reshape(1, B * n, hp, self.head_dim), k, v, [n] * B,
                                       list(mask)).view(B, n, hp, self.head_dim)
        if p > 1:
            out = exchange(out, group, scatter_dim=1, gather_dim=2)  # [B, N/P, h, d]
        return self.proj(out.reshape(B, n_local, C))


class Block(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm=True,
                 temporal=False, rope=None, sequence_parallel=False):
        super().__init__()
        self.temporal = temporal
        self.hidden_size = hidden
        sp = sequence_parallel and not temporal
        attn_cls = SeqParallelAttention if sp else Attention
        cross_cls = SeqParallelCrossAttention if sp else MultiHeadCrossAttention
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.attn = attn_cls(hidden, num_heads, qk_norm=qk_norm, rope=rope if temporal else None)
        self.cross_attn = cross_cls(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.drop_path = nn.Identity()
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden) / hidden ** 0.5)

    def forward(self, x, y, t, mask=None, x_mask=None, t0=None, T=None, S=None):
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
            h = rearrange(h, "B (T S) C -> (B S) T C", T=T, S=S)
            h = rearrange(self.attn(h), "(B S) T C -> B (T S) C", T=T, S=S)
        else:
            h = rearrange(h, "B (T S) C -> (B T) S C", T=T, S=S)
            h = rearrange(self.attn(h), "(B T) S C -> B (T S) C", T=T, S=S)
        gated = g_a * h
        if x_mask is not None:
            gated = t_mask_select(x_mask, gated, g_a0 * h, T, S)
        x = x + self.drop_path(gated)
        x = x + self.cross_attn(x, y, mask)
        h = t2i_modulate(self.norm2(x), sh_m, sc_m)
        if x_mask is not None:
            h = t_mask_select(x_mask, h, t2i_modulate(self.norm2(x), sh_m0, sc_m0), T, S)
        h = self.mlp(h)
        gated = g_m * h
        if x_mask is not None:
            gated = t_mask_select(x_mask, gated, g_m0 * h, T, S)
        return x + self.drop_path(gated)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t, dtype):
        return self.mlp(sinusoid(t, self.freq_dim).to(dtype))


class CaptionEmbedder(nn.Module):
    def __init__(self, in_channels: int, hidden: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden, hidden)
        self.register_buffer("y_embedding",
                             torch.randn(token_num, in_channels) / in_channels ** 0.5)

    def forward(self, y):
        return self.y_proj(y)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden) / hidden ** 0.5)

    def forward(self, x, t, x_mask=None, t0=None, T=None, S=None):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = t2i_modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            x = t_mask_select(x_mask, x, t2i_modulate(self.norm_final(x), shift0, scale0), T, S)
        return self.linear(x)


def pos_embed_2d(h: int, w: int, dim: int, scale: float, base_size: int, dtype, device):
    """[1, h*w, dim]: sin/cos of the column coordinate in the first dim/2 channels, of the row
    coordinate in the last dim/2; coordinates scaled by base_size / (size * scale)."""
    f = 1.0 / 10000 ** (torch.arange(0, dim // 2, 2, dtype=torch.float32) / (dim // 2))
    rows = torch.arange(h, dtype=torch.float32) / scale * (base_size / h)
    cols = torch.arange(w, dtype=torch.float32) / scale * (base_size / w)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")

    def axis(p):
        a = p.reshape(-1)[:, None] * f[None]
        return torch.cat([a.sin(), a.cos()], dim=-1)

    return torch.cat([axis(cc), axis(rr)], dim=-1)[None].to(device=device, dtype=dtype)


class UpstreamShapedSTDiT3(nn.Module):
    """``forward(x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None,
    **kwargs)``; like upstream, fps, height and width are required and extra keywords are
    ignored."""

    def __init__(self, in_channels=4, patch_size=(1, 2, 2), hidden_size=32, depth=2,
                 num_heads=4, mlp_ratio=4.0, caption_channels=16, model_max_length=8,
                 input_sq_size=64, qk_norm=True, enable_sequence_parallelism=False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, 2 * in_channels
        self.patch_size = tuple(patch_size)
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.input_sq_size = input_sq_size
        self.enable_sequence_parallelism = enable_sequence_parallelism
        head_dim = hidden_size // num_heads
        self.register_buffer("rope_freqs", 10000.0 ** (-torch.arange(0, head_dim, 2).float()
                                                        / head_dim), persistent=False)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv3d(in_channels, hidden_size, self.patch_size,
                                         stride=self.patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.fps_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length)
        kw = dict(mlp_ratio=mlp_ratio, qk_norm=qk_norm,
                  sequence_parallel=enable_sequence_parallelism)
        self.spatial_blocks = nn.ModuleList([Block(hidden_size, num_heads, **kw)
                                             for _ in range(depth)])
        self.temporal_blocks = nn.ModuleList([Block(hidden_size, num_heads, temporal=True,
                                                    rope=self.rotate, **kw) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, math.prod(self.patch_size), self.out_channels)

    def rotate(self, x):
        return rotate_interleaved(x, self.rope_freqs)

    def encode_text(self, y, mask=None):
        """[B, 1, L, Cy] -> the valid caption tokens of all samples packed [1, sum(L_i), C],
        and the per-sample lengths."""
        y = self.y_embedder(y)
        if mask is None:
            return y.squeeze(1).reshape(1, -1, self.hidden_size), [y.shape[2]] * y.shape[0]
        if mask.shape[0] != y.shape[0]:
            mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
        keep = mask.reshape(y.shape[0], -1) != 0
        return y.squeeze(1)[keep].view(1, -1, self.hidden_size), keep.sum(dim=1).tolist()

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None,
                **kwargs):
        dtype = self.x_embedder.proj.weight.dtype
        B = x.shape[0]
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)
        _, _, Tx, Hx, Wx = x.shape
        pt, ph, pw = self.patch_size
        T, H, W = -(-Tx // pt), -(-Hx // ph), -(-Wx // pw)
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

        x = F.pad(x, (0, W * pw - Wx, 0, H * ph - Hx, 0, T * pt - Tx))
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2)
        x = rearrange(x, "B (T S) C -> B T S C", T=T, S=S) + pos[:, None]
        group = sp_group() if self.enable_sequence_parallelism else None
        p = sp_size(group)
        if p > 1:
            if S % p:
                raise ValueError(f"S={S} spatial tokens cannot be split over {p} ranks")
            x = x.chunk(p, dim=2)[dist.get_rank(group)]
            S //= p
        x = rearrange(x, "B T S C -> B (T S) C", T=T, S=S)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial(x, y, t_mlp, y_lens, x_mask, t0_mlp, T, S)
            x = temporal(x, y, t_mlp, y_lens, x_mask, t0_mlp, T, S)
        if p > 1:
            x = rearrange(x, "B (T S) C -> B T S C", T=T, S=S).contiguous()
            parts = [torch.empty_like(x) for _ in range(p)]
            dist.all_gather(parts, x, group=group)
            S *= p
            x = rearrange(torch.cat(parts, dim=2), "B T S C -> B (T S) C", T=T, S=S)

        x = self.final_layer(x, t, x_mask, t0, T, S)
        x = rearrange(x, "B (Nt Nh Nw) (Tp Hp Wp C) -> B C (Nt Tp) (Nh Hp) (Nw Wp)",
                      Nt=T, Nh=H, Nw=W, Tp=pt, Hp=ph, Wp=pw, C=self.out_channels)
        return x[:, :, :Tx, :Hx, :Wx].float()


def load_stdit3_state_dict(double: UpstreamShapedSTDiT3, state_dict: dict) -> None:
    """Load a state dict of opensora_duca's STDiT3 (same names; its ``rope.freqs`` must equal
    the double's own rotary frequencies)."""
    sd = dict(state_dict)
    freqs = sd.pop("rope.freqs")
    if not torch.allclose(freqs.double(), double.rope_freqs.double(), rtol=1e-6):
        raise ValueError("rope.freqs differ from the double's rotary frequencies")
    double.load_state_dict(sd, strict=True)
