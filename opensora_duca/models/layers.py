"""STDiT3 building blocks, with the parameter names of Open-Sora 1.2 (see docs/stdit3.md)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import parallel as sp
from .attention import attention, check_backend
from .window import from_windows, resolve_kernel, to_windows

# torch's fused RMSNorm kernel (aten::_fused_rms_norm, CUDA); elsewhere F.rms_norm is a
# composite that copies a strided input first, so the explicit formula is leaner there
_FUSED_RMS_NORM = hasattr(F, "rms_norm") and hasattr(torch.ops.aten, "_fused_rms_norm")
_LOW_OR_SINGLE = (torch.float32, torch.bfloat16, torch.float16)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift (Open-Sora's t2i_modulate), as one fused multiply-add over x
    (one pass instead of two; fp32 rounding can differ from the two-op form by an ulp)."""
    return torch.addcmul(shift, x, 1 + scale)


def gated_add(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor,
              drop_path: Optional[nn.Module] = None) -> torch.Tensor:
    """A block's gated residual x + drop_path(gate * h), as one fused multiply-add whenever
    ``drop_path`` is the identity (always at inference)."""
    if isinstance(drop_path, DropPath) and drop_path.training and drop_path.p > 0:
        return x + drop_path(gate * h)
    return torch.addcmul(x, gate, h)


def _compiling() -> bool:
    """Whether torch.compile is tracing this call (no Python-side caches then)."""
    fn = getattr(torch.compiler, "is_compiling", None)
    if fn is None:  # pragma: no cover - torch < 2.3
        from torch._dynamo import is_compiling as fn
    return bool(fn())


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The interleaved-pair rotation x * cos + swap_pairs(x) * sin, where ``sin`` carries the
    pair signs (-sin on even channels, +sin on odd ones): three passes over x (pair swap,
    product, fused multiply-add), in x's dtype."""
    swapped = torch.stack((x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin)


def rotation_tables(ang: torch.Tensor, dtype: torch.dtype):
    """Angles [n, d/2] (float32) -> (cos, signed sin) [n, d] in ``dtype`` for
    :func:`rotate_pairs`."""
    ang = ang.repeat_interleave(2, dim=-1)
    sign = torch.tensor([-1.0, 1.0], dtype=ang.dtype, device=ang.device).repeat(ang.shape[-1] // 2)
    return ang.cos().to(dtype), (ang.sin() * sign).to(dtype)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding, cosine half first, then sine."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm's Mlp naming)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True),
                                 nn.SiLU(), nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor, dtype=None) -> torch.Tensor:
        f = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(f.to(dtype or self.mlp[0].weight.dtype))


class SizeEmbedder(TimestepEmbedder):
    """Embeds a scalar such as fps; accepts [B], [1] or [B, 1] and repeats to the batch."""

    def forward(self, s: torch.Tensor, bs: int) -> torch.Tensor:  # type: ignore[override]
        s = s.reshape(-1)
        if s.shape[0] != bs:
            if bs % s.shape[0]:
                raise ValueError(f"fps has {s.shape[0]} values; it must have 1 or batch size {bs}")
            s = s.repeat(bs // s.shape[0])
        return super().forward(s)


class CaptionEmbedder(nn.Module):
    """y_proj (fc1 -> GELU(tanh) -> fc2) and the learned null caption ``y_embedding``."""

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding",
                             torch.randn(token_num, in_channels) / in_channels ** 0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption: torch.Tensor, train: bool, force_drop_ids=None,
                uncond_prob: Optional[float] = None) -> torch.Tensor:
        """``uncond_prob`` (training) overrides the configured caption-dropout rate."""
        p = self.uncond_prob if uncond_prob is None else uncond_prob
        if (train and p > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(caption.shape[0], device=caption.device) < p
            else:
                drop = torch.as_tensor(force_drop_ids, device=caption.device) == 1
            caption = torch.where(drop[:, None, None, None], self.y_embedding.to(caption.dtype),
                                  caption)
        return self.y_proj(caption)


class PatchEmbed3D(nn.Module):
    """Conv3d patchify (kernel = stride = patch), right-padding T/H/W to multiples of the patch."""

    def __init__(self, patch_size, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size,
                              stride=self.patch_size)

    def forward(self, x):
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        x = F.pad(x, (0, (-w) % pw, 0, (-h) % ph, 0, (-t) % pt))
        # token-major [B, N, C] in memory: the whole residual stream then stays contiguous
        # (a channel-major stream makes every LayerNorm and linear copy its input)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


def _sincos(pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[n] positions -> [n, 2 * len(inv_freq)]: sin(pos * f) channels, then cos(pos * f)."""
    out = pos[:, None] * inv_freq[None]
    return torch.cat([out.sin(), out.cos()], dim=-1)


class PositionEmbedding2D(nn.Module):
    """Parameter-free 2-D sin-cos embedding with resolution scaling.

    As upstream, the first C/2 channels encode the column (w) coordinate and the last C/2 the
    row (h) coordinate (upstream names these halves the other way round; the numbers are these).
    """

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("inv_freq",
                             1.0 / 10000 ** (torch.arange(0, half, 2).float() / half),
                             persistent=False)

    def forward(self, h: int, w: int, scale, base_size: Optional[int], dtype, device):
        gh = torch.arange(h, dtype=torch.float32, device=device) / scale
        gw = torch.arange(w, dtype=torch.float32, device=device) / scale
        if base_size is not None:
            gh = gh * (base_size / h)
            gw = gw * (base_size / w)
        col = gw[None, :].expand(h, w).reshape(-1)
        row = gh[:, None].expand(h, w).reshape(-1)
        return torch.cat([_sincos(col, self.inv_freq), _sincos(row, self.inv_freq)],
                         dim=-1)[None].to(dtype)


class FramePositionEmbedding(nn.Module):
    """Parameter-free 1-D sin-cos embedding of the frame (latent time) index, ``[T, dim]``.

    Upstream STDiT3 has no absolute time signal (its temporal attention only sees relative
    offsets through RoPE); Open-Sora 1.0's STDiT added a fixed sin-cos over frames instead.
    STDiT3 adds this one at the input when built with ``temporal_pos_embed=True`` (off by
    default, so Open-Sora checkpoints and outputs are unchanged). Nothing is stored in the
    state dict.
    """

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.dim = dim
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(half).float() / half),
                             persistent=False)

    def forward(self, t: int, dtype, device) -> torch.Tensor:
        emb = _sincos(torch.arange(t, dtype=torch.float32, device=device),
                      self.inv_freq.to(device))
        if emb.shape[-1] < self.dim:  # odd dim: pad one zero channel
            emb = torch.nn.functional.pad(emb, (0, self.dim - emb.shape[-1]))
        return emb.to(dtype)


class RotaryEmbedding(nn.Module):
    """Interleaved-pair rotary embedding over the sequence axis (rotary_embedding_torch layout).

    The angles are computed in float32 from ``freqs``; the rotation itself runs in the
    activations' dtype (as upstream's bf16 models do) from cos / sin tables that are built once
    per (length or grid, dtype, device) and reused by every block and step; they are rebuilt
    when ``freqs`` changes (a checkpoint load, a move to another device or dtype).
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        exponents = torch.arange(0, dim, 2)[: dim // 2].float() / dim
        self.freqs = nn.Parameter(1.0 / theta ** exponents, requires_grad=False)
        self._tables: dict = {}

    def _cached(self, key: tuple, scale, build):
        """The tables for ``key``, built by ``build()`` on a miss. A tensor ``scale`` (computed
        on the device, read without a sync) is held by its entry and matched by identity."""
        if _compiling():
            return build()
        f = self.freqs
        key = key + (f.dtype, f.device, f.data_ptr(), f._version,
                     None if isinstance(scale, torch.Tensor) else scale)
        hit = self._tables.get(key)
        if hit is not None and (not isinstance(scale, torch.Tensor) or hit[0] is scale):
            return hit[1]
        if len(self._tables) >= 16:
            self._tables.clear()
        tables = build()
        self._tables[key] = (scale, tables)
        return tables

    def rotate_queries_or_keys(self, x: torch.Tensor, seq_dim: int = -2) -> torch.Tensor:
        n = x.shape[seq_dim]
        if seq_dim not in (-2, x.ndim - 2):
            raise ValueError(f"rotary embedding: seq_dim={seq_dim} is not supported; accepted: -2")

        def build():
            pos = torch.arange(n, device=x.device, dtype=torch.float32)
            return rotation_tables(pos[:, None] * self.freqs.float()[None], x.dtype)

        cos, sin = self._cached(("1d", n, x.dtype, x.device), None, build)
        return rotate_pairs(x, cos, sin)

    def rotate_3d(self, x: torch.Tensor, grid, scale: Optional[float] = None) -> torch.Tensor:
        """Open-Sora 1.3's 3-D rotary embedding of x [..., N, d], N = n1*n2*n3 tokens ordered
        (n1 rows, n2 columns, n3 frames) = ``grid``. The head dimension is cut in three equal
        parts: the first is rotated by the frame index, the second by row / scale, the third
        by column / scale (``scale`` None = 1), each with these ``freqs`` (d/3 = 2 * len)."""
        n1, n2, n3 = (int(g) for g in grid)
        d = x.shape[-1]
        if d != 6 * self.freqs.shape[0]:
            raise ValueError(f"3-D rotary embedding: head dim {d} must be 3 x the rotation dim "
                             f"{2 * self.freqs.shape[0]}")

        def build():
            dtype = torch.promote_types(x.dtype, torch.float32)
            f = self.freqs.to(dtype)
            s = 1.0 if scale is None else scale
            dev = x.device
            shape = (n1, n2, n3)
            pos = (torch.arange(n3, device=dev, dtype=dtype)[None, None, :].expand(shape),
                   (torch.arange(n1, device=dev, dtype=dtype) / s)[:, None, None].expand(shape),
                   (torch.arange(n2, device=dev, dtype=dtype) / s)[None, :, None].expand(shape))
            ang = torch.cat([p.reshape(-1, 1) * f[None] for p in pos], dim=-1)  # [N, d/2]
            return rotation_tables(ang, x.dtype)

        cos, sin = self._cached(("3d", n1, n2, n3, x.dtype, x.device), scale, build)
        return rotate_pairs(x, cos, sin)


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        """weight * x / sqrt(mean(x^2) + eps), statistics in float32 (as upstream's
        LlamaRMSNorm). One fused kernel on CUDA where torch has one; elsewhere at inference
        three passes without a float32 copy of x (the sum of squares accumulates in float32,
        x * rstd is computed in float32 and rounded once to x's dtype, the weight multiplies in
        place); with autograd, under torch.compile (which fuses it) or in float64 the formula
        as written."""
        if _FUSED_RMS_NORM and x.is_cuda and x.dtype == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon)
        if (x.dtype in _LOW_OR_SINGLE and x.dtype == self.weight.dtype
                and not torch.is_grad_enabled() and not _compiling()):
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
            rstd = torch.rsqrt(norm.square() / x.shape[-1] + self.variance_epsilon)
            return torch.mul(x, rstd, out=torch.empty_like(x)).mul_(self.weight)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(dtype)


class SeqParallelState:
    """Per-forward facts shared by a model's spatial attention layers under sequence parallelism:
    the group and how many keys of the gathered sequence are real (the rest is row padding)."""

    def __init__(self):
        self.group = None
        self.valid_len: Optional[int] = None


class Attention(nn.Module):
    """Self-attention with qk RMSNorm, optional rotary embedding and Ulysses sequence
    parallelism. Called as ``attn(x)`` with ``x [B', N, C]`` (Open-Sora 1.2), or with the
    latent grid ``attn(x, H=rows, W=columns, scale=s)`` when it has Open-Sora 1.3 options:

    - ``rope``: 1-D rotary embedding over the sequence (1.2's temporal blocks);
    - ``rope3d``: 3-D rotary embedding (``RotaryEmbedding.rotate_3d``) over the (rows, columns,
      frames) position of each token -- in a spatial block (x ``[(B T), H*W, C]``) the frame
      part is position 0, in a window the positions are those inside the window;
    - ``kernel_size``: 3-D window attention in a temporal block (x ``[(B H W), T, C]``,
      token s = row * W + column): the grid is cut in windows of (rows, columns, frames) and
      attention runs inside each (see ``models.window``).

    Under sequence parallelism (``sp_state.group`` with P > 1) the spatial sequence, or for
    window attention the rows, are gathered and the heads scattered (all-to-all), rows beyond
    ``sp_state.valid_len`` (padding) are dropped from the keys (and from the windows), and the
    result is sent back. The qkv projection always runs on the input tokens in input order.

    With ``keep_attn_map`` set to True (math backend only) the last map is kept in
    ``last_attn_map`` for attention-map token scores; under window attention it holds what
    each token receives (summed over heads and real queries) as ``[B', 1, 1, N]`` in input
    order, which has the column sums of the full map.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, rope=None,
                 backend: str = "sdpa", sp_state: Optional[SeqParallelState] = None,
                 rope3d=None, kernel_size=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = LlamaRMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = LlamaRMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope
        self.rope3d = rope3d
        self.kernel_size = kernel_size
        self.backend = check_backend(backend)
        self.sp_state = sp_state
        self.keep_attn_map = False
        self.last_attn_map: Optional[torch.Tensor] = None

    @property
    def needs_grid(self) -> bool:
        """Whether forward needs the latent grid (H, W, scale)."""
        return self.kernel_size is not None or self.rope3d is not None

    def _attend(self, q, k, v, key_mask=None):
        if self.keep_attn_map:
            out, self.last_attn_map = attention(q, k, v, self.backend, key_mask=key_mask,
                                                scale=self.scale, return_map=True)
            return out
        return attention(q, k, v, self.backend, key_mask=key_mask, scale=self.scale)

    def forward(self, x: torch.Tensor, H: Optional[int] = None, W: Optional[int] = None,
                scale: Optional[float] = None) -> torch.Tensor:
        if self.kernel_size is not None:
            return self._window_forward(x, H, W, scale)
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        group = self.sp_state.group if self.sp_state is not None else None
        p = sp.group_size(group)
        if p > 1:  # gather the sequence, scatter the heads
            qkv = sp.all_to_all(qkv, group, scatter_dim=3, gather_dim=1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [b, h', N, d]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        if self.rope3d is not None:
            if W is None:
                raise ValueError("attention with a 3-D rotary embedding needs W (columns)")
            grid = (q.shape[2] // W, W, 1)
            q, k = self.rope3d(q, grid, scale), self.rope3d(k, grid, scale)
        if p > 1 and self.sp_state.valid_len is not None and self.sp_state.valid_len < k.shape[2]:
            k = k[:, :, : self.sp_state.valid_len]
            v = v[:, :, : self.sp_state.valid_len]
        out = self._attend(q, k, v).transpose(1, 2)  # [b, N, h', d]
        if p > 1:
            out = sp.all_to_all(out, group, scatter_dim=1, gather_dim=2)
        return self.proj(out.reshape(b, n, c))

    def _window_forward(self, x, H, W, scale):
        """Window attention over x [(B H W), T, C] (H = the rows held here)."""
        if H is None or W is None:
            raise ValueError("window attention (kernel_size) needs the latent grid H and W")
        bs, t, c = x.shape
        b, h, d = bs // (H * W), self.num_heads, self.head_dim
        qkv = self.qkv(x).view(b, H, W, t, 3, h, d)
        group = self.sp_state.group if self.sp_state is not None else None
        p = sp.group_size(group)
        rows = H
        if p > 1:  # gather the rows, scatter the heads; drop padding rows
            if self.keep_attn_map:
                raise ValueError("attention-map scores of window attention are not available "
                                 "under sequence parallelism; use scorer 'vnorm'")
            qkv = sp.all_to_all(qkv, group, scatter_dim=5, gather_dim=1)
            rows = min(qkv.shape[1], self.sp_state.valid_len // W)
            qkv = qkv[:, :rows]
        hp = qkv.shape[5]
        dims = (rows, W, t)
        kernel = resolve_kernel(self.kernel_size, dims)
        win, real = to_windows(qkv.reshape(b, rows, W, t, 3 * hp * d), kernel)
        q, k, v = win.view(win.shape[0], -1, 3, hp, d).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope3d is not None:
            q, k = self.rope3d(q, kernel, scale), self.rope3d(k, kernel, scale)
        out = self._attend(q, k, v, key_mask=real).transpose(1, 2)  # [windows, n, h', d]
        if self.keep_attn_map:
            self.last_attn_map = self._received(self.last_attn_map, real, dims, kernel, bs, t)
        out = from_windows(out.reshape(out.shape[0], out.shape[1], hp * d), dims, kernel)
        if p > 1:  # back: pad the rows again, scatter them, gather the heads
            out = F.pad(out, (0, 0, 0, 0, 0, 0, 0, H * p - rows)).view(b, H * p, W, t, hp, d)
            out = sp.all_to_all(out, group, scatter_dim=1, gather_dim=4)
        return self.proj(out.reshape(bs, t, c))

    @staticmethod
    def _received(amap, real, dims, kernel, bs, t):
        """Window maps [windows, h, n, n] -> attention received per token [(B H W), 1, 1, T]."""
        if real is not None:
            amap = amap * real[:, None, :, None]
        r = amap.float().sum(dim=(1, 2))[..., None]  # [windows, n, 1]
        return from_windows(r, dims, kernel).reshape(bs, 1, 1, t)


class MultiHeadCrossAttention(nn.Module):
    """Queries from the video tokens, keys/values from the caption; called ``(x, y, mask)`` with
    ``x [B, N, C]``, ``y [B, L, C]``, ``mask`` bool ``[B, L]`` or None. Per query token, so it
    needs no communication under sequence parallelism."""

    def __init__(self, d_model: int, num_heads: int, backend: str = "sdpa"):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"hidden_size {d_model} is not divisible by num_heads {num_heads}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, d_model * 2)
        self.proj = nn.Linear(d_model, d_model)
        self.backend = "math" if backend == "math" else "sdpa"  # masked keys: sdpa or math

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: Optional[torch.Tensor] = None):
        b, n, c = x.shape
        q = self.q_linear(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_linear(cond).view(b, -1, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, self.backend, key_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class T2IFinalLayer(nn.Module):
    """LayerNorm, modulation by ``t`` (the timestep embedding, not ``t_mlp``) and a linear map
    to the patch outputs.

    With ``x_mask`` it follows Open-Sora 1.2.0 exactly: the modulated ``x`` is normalised and
    modulated once more with the t0 shift/scale, and frames where ``x_mask`` is False take that
    twice-modulated version (the released checkpoints were trained with this form).
    """

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x, t, x_mask=None, t0=None, T=None, S=None):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            x0 = modulate(self.norm_final(x), shift0, scale0)  # LN of the modulated x
            x = torch.where(x_mask[:, :, None, None], x.unflatten(1, (T, S)),
                            x0.unflatten(1, (T, S))).flatten(1, 2)
        return self.linear(x)


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's residual branch is zeroed with probability
    ``p`` and kept ones are scaled by 1 / (1 - p); the identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def select_by_frame(x_mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame choice between two [B, 1, C] modulation vectors -> [B, T, 1, C]:
    ``a`` where x_mask [B, T] is True, ``b`` where it is False."""
    return torch.where(x_mask[:, :, None, None], a[:, None], b[:, None])
