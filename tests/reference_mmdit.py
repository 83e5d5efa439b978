"""A float64 reference forward of Open-Sora 2.0's MMDiT, independent of the model code.

It reads a state dict by upstream's parameter names and evaluates the equations directly:
linear maps as ``x @ W.T + b``, the norms and activations written out, attention one query
token at a time with an explicit softmax, and the rotary embedding applied pair by pair from
an explicit list of (channel a, channel b, axis, frequency) pairs:

- interleaved form (``use_liger_rope=False``): axis i owns channels [o_i, o_i + d_i) (o_i the
  sum of the earlier axes' d); its k-th pair is (o_i + 2k, o_i + 2k + 1), frequency
  theta^(-2k/d_i);
- rotate-half form (``use_liger_rope=True``): the D/2 frequencies are listed axis by axis
  (axis i: theta^(-2k/d_i), k < d_i/2); list entry j pairs channel j with channel j + D/2.

A pair (a, b) at angle phi becomes (x_a cos phi - x_b sin phi, x_b cos phi + x_a sin phi).
Everything is float64 (the rotary angles too), so the model run in float64 must match it to
rounding.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def _p(sd, name):
    return sd[name].to(F64)


def linear(sd, name, x):
    y = x @ _p(sd, name + ".weight").T
    if name + ".bias" in sd:
        y = y + _p(sd, name + ".bias")
    return y


def silu(x):
    return x / (1 + torch.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def rms_norm(x, scale, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * scale


def time_embed(t, dim=256, max_period=10000.0):
    t = t.to(F64) * 1000.0
    half = dim // 2
    k = torch.arange(half, dtype=F64)
    args = t[:, None] * torch.exp(-math.log(max_period) * k / half)[None]
    return torch.cat((torch.cos(args), torch.sin(args)), -1)


def rotary_pairs(axes_dim, theta, liger):
    """[(channel a, channel b, axis, frequency)] for one head."""
    pairs = []
    if liger:
        freqs = [(i, theta ** (-2.0 * k / d)) for i, d in enumerate(axes_dim)
                 for k in range(d // 2)]
        half = len(freqs)
        for j, (axis, f) in enumerate(freqs):
            pairs.append((j, j + half, axis, f))
    else:
        off = 0
        for i, d in enumerate(axes_dim):
            for k in range(d // 2):
                pairs.append((off + 2 * k, off + 2 * k + 1, i, theta ** (-2.0 * k / d)))
            off += d
    return pairs


def rotate(x, pos, pairs):
    """x [D] of one token and head, pos [n_axes] -> rotated copy."""
    out = x.clone()
    for a, b, axis, f in pairs:
        phi = float(pos[axis]) * f
        c, s = math.cos(phi), math.sin(phi)
        out[a] = x[a] * c - x[b] * s
        out[b] = x[b] * c + x[a] * s
    return out


def joint_attention(q, k, v, pos, pairs):
    """q, k, v [N, H, D] of one sample (already QK-normed), pos [N, n_axes] -> [N, H*D]."""
    n, h, d = q.shape
    qr = torch.stack([torch.stack([rotate(q[i, j], pos[i], pairs) for j in range(h)])
                      for i in range(n)])
    kr = torch.stack([torch.stack([rotate(k[i, j], pos[i], pairs) for j in range(h)])
                      for i in range(n)])
    out = torch.zeros(n, h, d, dtype=F64)
    for j in range(h):
        for i in range(n):  # one query token at a time
            logits = (kr[:, j] @ qr[i, j]) / math.sqrt(d)
            w = torch.exp(logits - logits.max())
            w = w / w.sum()
            out[i, j] = w @ v[:, j]
    return out.reshape(n, h * d)


def _qkv(sd, prefix, x, fused_names, split_names, hidden, mlp_hidden=0):
    """-> q, k, v [N, hidden] (and the MLP input when mlp_hidden)."""
    if prefix + fused_names[0] + ".weight" in sd:
        y = linear(sd, prefix + fused_names[0], x)
        q, k, v = y[:, :hidden], y[:, hidden:2 * hidden], y[:, 2 * hidden:3 * hidden]
        mlp = y[:, 3 * hidden:]
    else:
        q = linear(sd, prefix + split_names[0], x)
        k = linear(sd, prefix + split_names[1], x)
        y = linear(sd, prefix + split_names[2], x)
        v, mlp = y[:, :hidden], y[:, hidden:]
    return q, k, v, mlp


def _heads_norm(sd, prefix, q, k, heads):
    n, c = q.shape
    q = q.reshape(n, heads, c // heads)
    k = k.reshape(n, heads, c // heads)
    return (rms_norm(q, _p(sd, prefix + "norm.query_norm.scale")),
            rms_norm(k, _p(sd, prefix + "norm.key_norm.scale")))


def reference_forward(sd, cfg, img, img_ids, txt, txt_ids, timesteps, y_vec, cond=None,
                      guidance=None):
    """The model's output [B, L, in_channels] in float64. ``cfg``: a mapping or object with
    the MMDiTConfig fields (hidden_size, num_heads, depth, depth_single_blocks, axes_dim,
    theta, use_liger_rope, cond_embed, guidance_embed)."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k))
    hidden, heads = get("hidden_size"), get("num_heads")
    pairs = rotary_pairs(list(get("axes_dim")), get("theta"), get("use_liger_rope"))
    outs = []
    for b in range(img.shape[0]):
        x_img = linear(sd, "img_in", img[b].to(F64))
        if get("cond_embed"):
            x_img = x_img + linear(sd, "cond_in", cond[b].to(F64))
        t_emb = time_embed(timesteps.reshape(-1)[b:b + 1])
        vec = linear(sd, "time_in.out_layer", silu(linear(sd, "time_in.in_layer", t_emb)))
        if get("guidance_embed"):
            g_emb = time_embed(guidance.reshape(-1)[b:b + 1])
            vec = vec + linear(sd, "guidance_in.out_layer",
                               silu(linear(sd, "guidance_in.in_layer", g_emb)))
        yv = y_vec[b:b + 1].to(F64)
        vec = vec + linear(sd, "vector_in.out_layer", silu(linear(sd, "vector_in.in_layer", yv)))
        x_txt = linear(sd, "txt_in", txt[b].to(F64))
        pos = torch.cat((txt_ids[b], img_ids[b])).to(F64)
        n_txt = x_txt.shape[0]

        for i in range(get("depth")):
            pre = f"double_blocks.{i}."
            streams = {}
            for s, x in (("txt", x_txt), ("img", x_img)):
                mod = linear(sd, pre + f"{s}_mod.lin", silu(vec))[0].chunk(6)
                xm = (1 + mod[1]) * layer_norm(x) + mod[0]
                q, k, v, _ = _qkv(sd, pre + f"{s}_attn.", xm, ("qkv",),
                                  ("q_proj", "k_proj", "v_proj"), hidden)
                q, k = _heads_norm(sd, pre + f"{s}_attn.", q, k, heads)
                streams[s] = (mod, q, k, v.reshape(v.shape[0], heads, -1))
            q = torch.cat((streams["txt"][1], streams["img"][1]))
            k = torch.cat((streams["txt"][2], streams["img"][2]))
            v = torch.cat((streams["txt"][3], streams["img"][3]))
            att = joint_attention(q, k, v, pos, pairs)
            new = {}
            for s, x, a in (("txt", x_txt, att[:n_txt]), ("img", x_img, att[n_txt:])):
                mod = streams[s][0]
                x = x + mod[2] * linear(sd, pre + f"{s}_attn.proj", a)
                h = (1 + mod[4]) * layer_norm(x) + mod[3]
                h = linear(sd, pre + f"{s}_mlp.2", gelu_tanh(linear(sd, pre + f"{s}_mlp.0", h)))
                new[s] = x + mod[5] * h
            x_txt, x_img = new["txt"], new["img"]

        x = torch.cat((x_txt, x_img))
        for i in range(get("depth_single_blocks")):
            pre = f"single_blocks.{i}."
            mod = linear(sd, pre + "modulation.lin", silu(vec))[0].chunk(3)
            xm = (1 + mod[1]) * layer_norm(x) + mod[0]
            q, k, v, mlp = _qkv(sd, pre, xm, ("linear1",), ("q_proj", "k_proj", "v_mlp"), hidden)
            q, k = _heads_norm(sd, pre, q, k, heads)
            att = joint_attention(q, k, v.reshape(v.shape[0], heads, -1), pos, pairs)
            x = x + mod[2] * linear(sd, pre + "linear2", torch.cat((att, gelu_tanh(mlp)), -1))

        y = x[n_txt:]
        shift, scale = linear(sd, "final_layer.adaLN_modulation.1", silu(vec))[0].chunk(2)
        y = (1 + scale) * layer_norm(y) + shift
        outs.append(linear(sd, "final_layer.linear", y))
    return torch.stack(outs)
