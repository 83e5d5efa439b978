"""An independent float64 STDiT3, written from the equations of docs/stdit3.md.

It uses nothing from ``opensora_duca``: only plain tensor arithmetic on a parameter dict
``P`` (state-dict name -> tensor), so it can check the package's model. Conventions are the
page's: LayerNorm without affine (eps 1e-6), GELU(tanh), per-head RMSNorm (eps 1e-6) on q and
k, interleaved-pair rotary embedding over frames in temporal blocks, captions attended per
sample over their valid tokens only, the 2-D sin-cos position embedding with the column (w)
coordinate in the first C/2 channels (as upstream's code lays it out), timestep / fps
sinusoids with the cosine half first.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


# ------------------------------------------------------------------------- primitives
def layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def linear(P, name, x):
    return x @ P[name + ".weight"].T + P[name + ".bias"]


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x / (1.0 + torch.exp(-x))


def rms_norm(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def softmax(s):
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def sdp_attention(q, k, v):
    """q [..., n, d], k/v [..., m, d] -> softmax(q k^T / sqrt(d)) v."""
    return softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])) @ v


def sinusoid(t, dim=256, max_period=10000.0):
    half = dim // 2
    f = torch.exp(-math.log(max_period) * torch.arange(half, dtype=F64) / half)
    a = t.to(F64)[:, None] * f[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


def rope_freqs(head_dim):
    """f_i = 10000^(-2i/d), i < d/2."""
    i = torch.arange(head_dim // 2, dtype=F64)
    return 10000.0 ** (-2.0 * i / head_dim)


def rotary(x):
    """x [..., T, d]: pair (x_2i, x_2i+1) at position p rotated by angle p * f_i."""
    n, d = x.shape[-2], x.shape[-1]
    ang = torch.arange(n, dtype=F64)[:, None] * rope_freqs(d)[None]  # [T, d/2]
    return rotate_pairs(x, ang)


def rotate_pairs(x, ang):
    """x [..., n, 2m], ang [n, m]: pair (x_2i, x_2i+1) rotated by ang[:, i]."""
    c, s = torch.cos(ang), torch.sin(ang)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x1 * c + x0 * s
    return out


def pos_embed_2d(h, w, dim, scale, base_size):
    """[h*w, dim], row-major tokens; channels [axis(col) | axis(row)], axis(p) = [sin, cos]."""
    k = torch.arange(dim // 4, dtype=F64)
    f = 1.0 / 10000.0 ** (2.0 * k / (dim / 2))

    def axis(pos):
        a = pos[:, None] * f[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=-1)  # [n, dim/2]

    rows = torch.arange(h, dtype=F64) / scale * base_size / h
    cols = torch.arange(w, dtype=F64) / scale * base_size / w
    emb = torch.zeros(h, w, dim, dtype=F64)
    emb[:, :, : dim // 2] = axis(cols)[None, :, :]
    emb[:, :, dim // 2:] = axis(rows)[:, None, :]
    return emb.reshape(h * w, dim)


def frame_pos_embed(t, dim):
    """[t, dim]: channel j < dim/2 is sin(f_j * frame), channel dim/2 + j is cos(f_j * frame),
    f_j = 10000^(-j / (dim/2)) (the optional absolute frame-index embedding)."""
    half = dim // 2
    f = 10000.0 ** (-torch.arange(half, dtype=F64) / half)
    a = torch.arange(t, dtype=F64)[:, None] * f[None]
    return torch.cat([torch.sin(a), torch.cos(a)], dim=-1)


# ----------------------------------------------------------------------------- parts
def embed_scalar(P, prefix, s):
    """MLP(sinusoid_256(s)) = mlp.2(SiLU(mlp.0(.)))."""
    return linear(P, prefix + ".mlp.2", silu(linear(P, prefix + ".mlp.0", sinusoid(s))))


def self_attention(P, prefix, h, heads, use_rope):
    """h [N, n, C] (N independent sequences of length n)."""
    N, n, C = h.shape
    d = C // heads
    qkv = linear(P, prefix + "attn.qkv", h).reshape(N, n, 3, heads, d)
    q, k, v = (qkv[:, :, j].permute(0, 2, 1, 3) for j in range(3))  # [N, heads, n, d]
    if prefix + "attn.q_norm.weight" in P:
        q = rms_norm(q, P[prefix + "attn.q_norm.weight"])
        k = rms_norm(k, P[prefix + "attn.k_norm.weight"])
    if use_rope:
        q, k = rotary(q), rotary(k)
    out = sdp_attention(q, k, v).permute(0, 2, 1, 3).reshape(N, n, C)
    return linear(P, prefix + "attn.proj", out)


def cross_attention(P, prefix, x, y, mask, heads):
    """x [B, N, C]; y [B, L, C]; mask [B, L] (1 = valid). Each sample attends to its own valid
    caption tokens only."""
    B, N, C = x.shape
    d = C // heads
    outs = []
    for b in range(B):
        valid = mask[b].bool()
        q = linear(P, prefix + "cross_attn.q_linear", x[b]).reshape(N, heads, d).transpose(0, 1)
        kv = linear(P, prefix + "cross_attn.kv_linear", y[b][valid]).reshape(-1, 2, heads, d)
        k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)
        outs.append(sdp_attention(q, k, v).transpose(0, 1).reshape(N, C))
    return linear(P, prefix + "cross_attn.proj", torch.stack(outs))


def per_frame(table, t_vec, t0_vec, x_mask, T, n):
    """table [n, C] + t [B, n*C] -> n tensors [B, T, 1, C], using the t0 version on frames
    where x_mask is False."""
    B = t_vec.shape[0]
    m = table[None] + t_vec.reshape(B, n, -1)  # [B, n, C]
    m = m[:, None].expand(B, T, n, m.shape[-1]).clone()
    if x_mask is not None:
        m0 = table[None] + t0_vec.reshape(B, n, -1)
        for b in range(B):
            for t in range(T):
                if not bool(x_mask[b, t]):
                    m[b, t] = m0[b]
    return [m[:, :, j][:, :, None] for j in range(n)]


def block(P, prefix, x, y, mask, t_mlp, t0_mlp, x_mask, temporal, heads):
    """One STDiT3 block on x [B, T, S, C]."""
    B, T, S, C = x.shape
    sh1, sc1, g1, sh2, sc2, g2 = per_frame(P[prefix + "scale_shift_table"], t_mlp, t0_mlp,
                                           x_mask, T, 6)
    h = layer_norm(x) * (1 + sc1) + sh1
    if temporal:
        a = self_attention(P, prefix, h.permute(0, 2, 1, 3).reshape(B * S, T, C), heads, True)
        a = a.reshape(B, S, T, C).permute(0, 2, 1, 3)
    else:
        a = self_attention(P, prefix, h.reshape(B * T, S, C), heads, False).reshape(B, T, S, C)
    x = x + g1 * a
    x = x + cross_attention(P, prefix, x.reshape(B, T * S, C), y, mask, heads).reshape(
        B, T, S, C)
    h = layer_norm(x) * (1 + sc2) + sh2
    mlp = linear(P, prefix + "mlp.fc2", gelu_tanh(linear(P, prefix + "mlp.fc1", h)))
    return x + g2 * mlp


def final_layer(P, x, t_emb, t0_emb=None, x_mask=None):
    """x [B, T, S, C] -> [B, T, S, patch outputs]. t_emb [B, C] (not t_mlp) is added to both
    rows of the [2, C] table: shift = row 0 + t_emb, scale = row 1 + t_emb.

    u = LN(x) * (1 + scale) + shift. With x_mask, frames where it is False take
    u0 = LN(u) * (1 + scale0) + shift0 (the LayerNorm of the already modulated u, with the
    table + t0_emb shift/scale), as Open-Sora 1.2.0 computes it."""
    tab = P["final_layer.scale_shift_table"]
    u = layer_norm(x) * (1 + (tab[1] + t_emb)[:, None, None]) + (tab[0] + t_emb)[:, None, None]
    if x_mask is not None:
        u0 = layer_norm(u) * (1 + (tab[1] + t0_emb)[:, None, None]) + \
            (tab[0] + t0_emb)[:, None, None]
        u = u.clone()
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                if not bool(x_mask[b, t]):
                    u[b, t] = u0[b, t]
    return linear(P, "final_layer.linear", u)


def patch_embed(P, z, patch):
    """z [B, Cin, Tx, Hx, Wx] -> [B, T, H, W, C], right-padding to multiples of the patch."""
    pt, ph, pw = patch
    B, Cin, Tx, Hx, Wx = z.shape
    T, H, W = -(-Tx // pt), -(-Hx // ph), -(-Wx // pw)
    zp = torch.zeros(B, Cin, T * pt, H * ph, W * pw, dtype=F64)
    zp[:, :, :Tx, :Hx, :Wx] = z
    zp = zp.reshape(B, Cin, T, pt, H, ph, W, pw)
    w = P["x_embedder.proj.weight"]  # [C, Cin, pt, ph, pw]
    return torch.einsum("bctihjwk,ocijk->bthwo", zp, w) + P["x_embedder.proj.bias"]


def forward(P, z, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None,
            patch=(1, 2, 2), heads=4, depth=1, input_sq_size=512, return_tokens=False,
            temporal_pos_embed=False):
    """The whole model: z [B, Cin, Tx, Hx, Wx] -> [B, Cout, Tx, Hx, Wx] (float64).

    With ``return_tokens`` also returns the final layer's output tokens [B, T*H*W, p*Cout]."""
    P = {k: v.to(F64) for k, v in P.items()}
    z, timestep, y = z.to(F64), timestep.to(F64).reshape(-1), y.to(F64)
    B = z.shape[0]
    C = P["x_embedder.proj.bias"].shape[0]
    x = patch_embed(P, z, patch)
    _, T, H, W, _ = x.shape
    S = H * W
    scale = 1.0 if height is None else math.sqrt(float(height) * float(width)) / input_sq_size
    x = x.reshape(B, T, S, C) + pos_embed_2d(H, W, C, scale, round(math.sqrt(S)))[None, None]
    if temporal_pos_embed:
        x = x + frame_pos_embed(T, C)[None, :, None]

    fps = torch.tensor([24.0]) if fps is None else torch.as_tensor(fps).reshape(-1)
    fps = fps.to(F64).repeat(B // fps.shape[0])
    fps_emb = embed_scalar(P, "fps_embedder", fps)
    t_emb = embed_scalar(P, "t_embedder", timestep) + fps_emb
    t_mlp = linear(P, "t_block.1", silu(t_emb))
    t0_emb = t0_mlp = None
    if x_mask is not None:
        t0_emb = embed_scalar(P, "t_embedder", torch.zeros(B, dtype=F64)) + fps_emb
        t0_mlp = linear(P, "t_block.1", silu(t0_emb))

    yy = y[:, 0]
    yy = linear(P, "y_embedder.y_proj.fc2", gelu_tanh(linear(P, "y_embedder.y_proj.fc1", yy)))
    if mask is None:
        mask = torch.ones(B, yy.shape[1])
    mask = mask.reshape(mask.shape[0], -1)
    if mask.shape[0] != B:
        mask = mask.repeat(B // mask.shape[0], 1)

    for i in range(depth):
        x = block(P, f"spatial_blocks.{i}.", x, yy, mask, t_mlp, t0_mlp, x_mask, False, heads)
        x = block(P, f"temporal_blocks.{i}.", x, yy, mask, t_mlp, t0_mlp, x_mask, True, heads)

    tokens = final_layer(P, x, t_emb, t0_emb, x_mask)  # [B, T, S, pt*ph*pw*Cout]
    pt, ph, pw = patch
    cout = tokens.shape[-1] // (pt * ph * pw)
    out = tokens.reshape(B, T, H, W, pt, ph, pw, cout).permute(0, 7, 1, 4, 2, 5, 3, 6)
    out = out.reshape(B, cout, T * pt, H * ph, W * pw)[:, :, : z.shape[2], : z.shape[3],
                                                        : z.shape[4]]
    if return_tokens:
        return out, tokens.reshape(B, T * S, -1)
    return out


def block_reference(P, prefix, x_tokens, y, mask, t_mlp, t0_mlp, x_mask, T, S, temporal,
                    heads):
    """One block on flat tokens [B, T*S, C] (frame-major), for comparison with a block module."""
    P = {k: v.to(F64) for k, v in P.items()}
    B, N, C = x_tokens.shape
    out = block(P, prefix, x_tokens.to(F64).reshape(B, T, S, C), y.to(F64), mask, t_mlp,
                t0_mlp, x_mask, temporal, heads)
    return out.reshape(B, N, C)


__all__ = ["forward", "block_reference", "final_layer", "pos_embed_2d", "rotary", "rope_freqs",
           "sinusoid"]
