"""An independent float64 Open-Sora 1.3 STDiT3, written from the equations of docs/stdit3.md
("Open-Sora 1.3"), on top of the 1.2 reference (tests/reference_impl.py).

Like that reference it uses nothing from ``opensora_duca``: plain tensor arithmetic on a
parameter dict. Window attention is written token by token: every real token of a window is a
query and a key, nothing else is, and the rotary positions are the offsets inside the window.
"""
from __future__ import annotations

import math

import reference_impl as ref
import torch
from reference_impl import F64, layer_norm, linear, rms_norm, rotate_pairs, sdp_attention


def rope3d(x, pos, freqs):
    """x [..., n, d]; pos [n, 3] = (frame, row, column) positions (already divided by the
    scale where it applies). Thirds of d rotated by the frame, row and column position."""
    r = x.shape[-1] // 3
    parts = [rotate_pairs(x[..., j * r:(j + 1) * r], pos[:, j:j + 1] * freqs[None])
             for j in range(3)]
    return torch.cat(parts, dim=-1)


def attend(P, prefix, h, heads, pos=None, freqs=None):
    """Self-attention among the tokens h [n, C] of one sequence (a frame or a window);
    ``pos`` [n, 3] turns on the 3-D rotary embedding."""
    n, C = h.shape
    d = C // heads
    qkv = linear(P, prefix + "attn.qkv", h).reshape(n, 3, heads, d)
    q, k, v = (qkv[:, j].transpose(0, 1) for j in range(3))  # [heads, n, d]
    if prefix + "attn.q_norm.weight" in P:
        q = rms_norm(q, P[prefix + "attn.q_norm.weight"])
        k = rms_norm(k, P[prefix + "attn.k_norm.weight"])
    if pos is not None:
        q, k = rope3d(q, pos, freqs), rope3d(k, pos, freqs)
    return linear(P, prefix + "attn.proj", sdp_attention(q, k, v).transpose(0, 1).reshape(n, C))


def spatial_attention(P, prefix, h, H, W, heads, scale, rope):
    """h [B, T, S, C]; per frame over its H*W tokens; 3-D rope with frame position 0."""
    B, T, S, C = h.shape
    pos = None
    if rope:
        rows = torch.arange(H, dtype=F64)[:, None].expand(H, W).reshape(-1)
        cols = torch.arange(W, dtype=F64)[None, :].expand(H, W).reshape(-1)
        pos = torch.stack([torch.zeros(S, dtype=F64), rows / scale, cols / scale], dim=1)
    out = torch.empty_like(h)
    for b in range(B):
        for t in range(T):
            out[b, t] = attend(P, prefix, h[b, t], heads, pos, P.get("rope.freqs"))
    return out


def window_attention(P, prefix, h, H, W, heads, scale, kernel):
    """h [B, T, S, C]; windows of (rows, columns, frames) = kernel (-1: whole axis)."""
    B, T, S, C = h.shape
    k1, k2, k3 = (d if k == -1 else k for k, d in zip(kernel, (H, W, T)))
    out = torch.empty_like(h)
    for a in range(0, H, k1):
        for c in range(0, W, k2):
            for f in range(0, T, k3):
                toks = [(r, col, t) for r in range(a, min(a + k1, H))
                        for col in range(c, min(c + k2, W)) for t in range(f, min(f + k3, T))]
                pos = torch.tensor([[t - f, (r - a) / scale, (col - c) / scale]
                                    for r, col, t in toks], dtype=F64)
                for b in range(B):
                    seq = torch.stack([h[b, t, r * W + col] for r, col, t in toks])
                    res = attend(P, prefix, seq, heads, pos, P["rope.freqs"])
                    for j, (r, col, t) in enumerate(toks):
                        out[b, t, r * W + col] = res[j]
    return out


def block(P, prefix, x, y, mask, t_mlp, t0_mlp, x_mask, temporal, heads, H, W, scale, opts,
          mask_index=None, y_null=None):
    """One 1.3 block on x [B, T, S, C]; opts = dict(kernel_size, use_spatial_rope)."""
    B, T, S, C = x.shape
    sh1, sc1, g1, sh2, sc2, g2 = ref.per_frame(P[prefix + "scale_shift_table"], t_mlp, t0_mlp,
                                               x_mask, T, 6)
    h = layer_norm(x) * (1 + sc1) + sh1
    if temporal and opts["kernel_size"] is not None:
        a = window_attention(P, prefix, h, H, W, heads, scale, opts["kernel_size"])
    elif temporal:  # 1.2 temporal attention: 1-D rope over frames
        a = ref.self_attention(P, prefix, h.permute(0, 2, 1, 3).reshape(B * S, T, C), heads,
                               True).reshape(B, S, T, C).permute(0, 2, 1, 3)
    else:
        a = spatial_attention(P, prefix, h, H, W, heads, scale, opts["use_spatial_rope"])
    x = x + g1 * a
    ca = torch.empty_like(x)
    for t in range(T):  # given frames read the null caption
        cap = y_null if mask_index and t in mask_index else y
        ca[:, t] = ref.cross_attention(P, prefix, x[:, t], cap, mask, heads)
    x = x + ca
    h = layer_norm(x) * (1 + sc2) + sh2
    return x + g2 * linear(P, prefix + "mlp.fc2", ref.gelu_tanh(linear(P, prefix + "mlp.fc1", h)))


def conv_patch(P, name, z, patch):
    """Patch embedding with the weights ``name``.proj.* (right-padded to the patch)."""
    Q = {"x_embedder.proj.weight": P[name + ".proj.weight"],
         "x_embedder.proj.bias": P[name + ".proj.bias"]}
    return ref.patch_embed(Q, z, patch)


def forward(P, z, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None,
            patch=(1, 2, 2), heads=4, depth=1, input_sq_size=512, kernel_size=None,
            use_spatial_rope=False, skip_temporal=False, cond=None, cond_mask=None,
            mask_index=None, y_null=None):
    """The 1.3 model: z [B, Cin, Tx, Hx, Wx] -> [B, Cout, Tx, Hx, Wx] (float64)."""
    P = {k: v.to(F64) for k, v in P.items()}
    z, timestep, y = z.to(F64), timestep.to(F64).reshape(-1), y.to(F64)
    B = z.shape[0]
    C = P["x_embedder.proj.bias"].shape[0]
    x = conv_patch(P, "x_embedder", z, patch)
    if mask_index is not None:
        x = x + conv_patch(P, "x_embedder_cond", cond.to(F64), patch) + \
            conv_patch(P, "x_embedder_cond_mask", cond_mask.to(F64), patch)
    _, T, H, W, _ = x.shape
    S = H * W
    scale = 1.0 if height is None else math.sqrt(float(height) * float(width)) / input_sq_size
    x = x.reshape(B, T, S, C) + ref.pos_embed_2d(H, W, C, scale, round(math.sqrt(S)))[None, None]

    fps = torch.tensor([24.0]) if fps is None else torch.as_tensor(fps).reshape(-1)
    fps = fps.to(F64).repeat(B // fps.shape[0])
    fps_emb = ref.embed_scalar(P, "fps_embedder", fps)
    t_emb = ref.embed_scalar(P, "t_embedder", timestep) + fps_emb
    t_mlp = linear(P, "t_block.1", ref.silu(t_emb))
    t0_emb = t0_mlp = None
    if x_mask is not None:
        t0_emb = ref.embed_scalar(P, "t_embedder", torch.zeros(B, dtype=F64)) + fps_emb
        t0_mlp = linear(P, "t_block.1", ref.silu(t0_emb))

    def caption(c):
        c = c.to(F64)[:, 0]
        return linear(P, "y_embedder.y_proj.fc2",
                      ref.gelu_tanh(linear(P, "y_embedder.y_proj.fc1", c)))
    yy = caption(y)
    yn = caption(y_null) if y_null is not None else None
    mask = torch.ones(B, yy.shape[1]) if mask is None else mask.reshape(mask.shape[0], -1)
    if mask.shape[0] != B:
        mask = mask.repeat(B // mask.shape[0], 1)

    opts = dict(kernel_size=kernel_size, use_spatial_rope=use_spatial_rope)
    common = dict(heads=heads, H=H, W=W, scale=scale, opts=opts, mask_index=mask_index,
                  y_null=yn)
    for i in range(depth):
        x = block(P, f"spatial_blocks.{i}.", x, yy, mask, t_mlp, t0_mlp, x_mask, False, **common)
        if not skip_temporal:
            x = block(P, f"temporal_blocks.{i}.", x, yy, mask, t_mlp, t0_mlp, x_mask, True,
                      **common)

    tokens = ref.final_layer(P, x, t_emb, t0_emb, x_mask)
    pt, ph, pw = patch
    cout = tokens.shape[-1] // (pt * ph * pw)
    out = tokens.reshape(B, T, H, W, pt, ph, pw, cout).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, cout, T * pt, H * ph, W * pw)[:, :, : z.shape[2], : z.shape[3],
                                                        : z.shape[4]]
