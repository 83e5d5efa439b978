"""Open-Sora 2.0's video MMDiT (a Flux-style double/single-stream DiT), checkpoint compatible.

Written from the equations of upstream Open-Sora 2.0 (``opensora/models/mmdit``, registered
there as ``flux``). Parameter names and shapes are upstream's, so ``Open_Sora_v2.safetensors``
loads unchanged. Supported:

- ``fused_qkv`` True (one ``qkv`` / ``linear1`` projection) and False (``q_proj``, ``k_proj``,
  ``v_proj`` / ``v_mlp``; the published checkpoint's layout);
- both rotary forms: ``use_liger_rope=False`` rotates interleaved channel pairs (2i, 2i+1)
  with float64 frequencies; ``use_liger_rope=True`` is the llama "rotate-half" convention
  (channel f pairs with f + D/2) with cos/sin built in float32 from the per-axis frequencies,
  as upstream's Liger kernel computes it (the published model was trained with it);
- ``cond_embed`` (i2v / v2v conditioning through ``cond_in``), ``guidance_embed``;
- attention through torch's ``scaled_dot_product_attention`` or, when the package is
  installed and the tensors are CUDA fp16/bf16, flash-attn (``attn_backend="auto"``; any
  backend of :mod:`opensora_duca.models.attention` can be named);
- Ulysses sequence parallelism (``enable_sequence_parallelism=True``), inference only: see
  :class:`MMDiTModel` and :mod:`opensora_duca.parallel.ulysses`;
- ``grad_ckpt_settings=(n_double, n_single)``: activation checkpointing of the first blocks
  while gradients are recorded.

Numerics follow upstream in fp32 / bf16 (rotary tables and RMS statistics in float32, cast
back). A model run in float64 keeps every intermediate in float64 instead (the tables too),
so it can be compared with a float64 reference.

Blocks delegate to a processor object, as upstream's do: ``block.processor(block, img, txt,
vec, pe)`` / ``block.processor(block, x, vec, pe)``; ``set_processor`` / ``get_processor``
swap it. The processors call the projections and MLPs as modules (so hooks see them).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import parallel as sp
from ..parallel import ulysses
from ..registry import MODELS
from ..utils.dtype import resolve_dtype
from .attention import attention as _attend
from .attention import check_backend


# --------------------------------------------------------------------------- config
@dataclass
class MMDiTConfig:
    """Upstream's ``MMDiTConfig`` fields (keyword construction; validated on creation)."""

    model_type = "MMDiT"  # class attribute, as upstream

    in_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: Sequence[int]
    theta: int
    qkv_bias: bool
    guidance_embed: bool
    from_pretrained: Optional[str] = None
    cache_dir: Optional[str] = None
    cond_embed: bool = False
    fused_qkv: bool = True
    grad_ckpt_settings: Optional[Sequence[int]] = None
    use_liger_rope: bool = False
    patch_size: int = 2

    def __post_init__(self):
        self.axes_dim = list(self.axes_dim) if isinstance(self.axes_dim, (list, tuple)) \
            else self.axes_dim
        self.validate()

    def get(self, attribute_name, default=None):
        return getattr(self, attribute_name, default)

    def __contains__(self, attribute_name):
        return hasattr(self, attribute_name)

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first bad field."""
        def bad(key, accepted):
            raise ValueError(f"MMDiT config {key}={getattr(self, key)!r} is not accepted; "
                             f"accepted: {accepted}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for key in ("in_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads",
                    "patch_size"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                bad(key, "an int >= 1")
        for key in ("depth", "depth_single_blocks"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 0:
                bad(key, "an int >= 0")
        for key in ("qkv_bias", "guidance_embed", "cond_embed", "fused_qkv", "use_liger_rope"):
            if not isinstance(getattr(self, key), bool):
                bad(key, "True or False")
        r = self.mlp_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) \
                or int(self.hidden_size * r) < 1:
            bad("mlp_ratio", "a number > 0 with int(hidden_size * mlp_ratio) >= 1")
        if self.hidden_size % self.num_heads:
            bad("num_heads", f"a divisor of hidden_size={self.hidden_size}")
        if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)) \
                or not self.theta > 0:
            bad("theta", "a number > 0")
        head_dim = self.hidden_size // self.num_heads
        ax = self.axes_dim
        if not isinstance(ax, list) or not ax or not all(is_int(a) and a > 0 and a % 2 == 0
                                                         for a in ax) or sum(ax) != head_dim:
            bad("axes_dim", f"a list of even ints > 0 summing to the head dim "
                            f"hidden_size/num_heads={head_dim}")
        g = self.grad_ckpt_settings
        if g is not None and not (isinstance(g, (list, tuple)) and len(g) == 2
                                  and all(is_int(v) and v >= 0 for v in g)):
            bad("grad_ckpt_settings", "None or (double blocks, single blocks), two ints >= 0")


# --------------------------------------------------------------------------- math
def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else computes in float32 (as upstream)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000,
                       time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [N, dim] of N (fractional) timesteps ``t`` in [0, 1]: t is scaled
    by ``time_factor`` in its own dtype, then cos | sin of t * exp(-ln(max_period) k / half),
    computed in float32 (float64 for a float64 ``t``) and returned in t's dtype when t is a
    floating tensor."""
    t = time_factor * t
    half = dim // 2
    work = _work_dtype(t.dtype)
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(0, half, dtype=work, device=t.device) / half)
    args = t[:, None].to(work) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        emb = emb.to(t)
    return emb


def _axis_angles(pos: Tensor, dim: int, theta, dtype: torch.dtype) -> Tensor:
    """pos [..., n] -> angles [..., n, dim/2]: pos * theta^(-2k/dim), in ``dtype``."""
    scale = torch.arange(0, dim, 2, dtype=dtype, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    return pos.to(dtype)[..., None] * omega


def rope_tables(ids: Tensor, axes_dim: Sequence[int], theta, dtype: torch.dtype) -> Tensor:
    """Interleaved-pair rotary tables for ids [B, L, n_axes]: [B, 1, L, D/2, 2, 2] holding the
    2x2 rotations ((cos, -sin), (sin, cos)); frequencies in float64, returned in ``dtype``."""
    mats = []
    for i, d in enumerate(axes_dim):
        ang = _axis_angles(ids[..., i], d, theta, torch.float64)
        cos, sin = ang.cos(), ang.sin()
        mats.append(torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)))
    return torch.cat(mats, dim=-3).unsqueeze(1).to(dtype)


def liger_rope_tables(ids: Tensor, axes_dim: Sequence[int], theta, dtype: torch.dtype):
    """Rotate-half rotary tables for ids [B, L, n_axes]: (cos, sin), each [B, L, D], built in
    ``dtype`` (float32 as upstream): the per-axis halves concatenated, then repeated twice."""
    angs = [_axis_angles(ids[..., i], d, theta, dtype) for i, d in enumerate(axes_dim)]
    ang = torch.cat(angs, dim=-1)
    return ang.cos().repeat(1, 1, 2).contiguous(), ang.sin().repeat(1, 1, 2).contiguous()


def apply_rope(q: Tensor, k: Tensor, pe) -> tuple[Tensor, Tensor]:
    """Rotate q, k [B, H, L, D] by ``pe``: a tensor (interleaved pairs, :func:`rope_tables`) or
    a (cos, sin) pair (rotate-half, :func:`liger_rope_tables`). Computed in the tables' dtype
    (at least float32), returned in the inputs' dtypes."""
    if isinstance(pe, Tensor):
        cos, sin = pe[..., 0, 0], pe[..., 1, 0]  # [B, 1, L, D/2]

        def rot(x):
            work = torch.promote_types(x.dtype, pe.dtype)
            x0, x1 = x.to(work).unflatten(-1, (-1, 2)).unbind(-1)
            out = torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1)
            return out.flatten(-2).to(x.dtype)
    else:
        cos, sin = (c[:, None] for c in pe)  # [B, 1, L, D]

        def rot(x):
            work = torch.promote_types(x.dtype, cos.dtype)
            xw = x.to(work)
            x1, x2 = xw.chunk(2, dim=-1)
            return (xw * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)
    return rot(q), rot(k)


def attention_heads(q: Tensor, k: Tensor, v: Tensor, pe, backend: str = "auto") -> Tensor:
    """Rotary embedding, then softmax(q k^T / sqrt(D)) v over all tokens; [B, H, L, D] in and
    out."""
    q, k = apply_rope(q, k, pe)
    return _attend(q, k, v, backend=backend)


def attention(q: Tensor, k: Tensor, v: Tensor, pe, backend: str = "auto") -> Tensor:
    """Upstream's ``attention``: q, k, v [B, H, L, D] -> rotary embedding, attention, heads
    merged [B, L, H*D]."""
    return merge_heads(attention_heads(q, k, v, pe, backend))


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, L, D] -> [B, L, H*D]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, L, H*D] -> [B, H, L, D]."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


# --------------------------------------------------------------------------- layers
class EmbedND(nn.Module):
    """ids [B, L, n_axes] -> interleaved-pair rotary tables (see :func:`rope_tables`)."""

    def __init__(self, dim: int, theta, axes_dim: Sequence[int]):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, list(axes_dim)

    def forward(self, ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return rope_tables(ids, self.axes_dim, self.theta, dtype)


class LigerEmbedND(EmbedND):
    """ids [B, L, n_axes] -> rotate-half (cos, sin) tables (see :func:`liger_rope_tables`)."""

    def forward(self, ids: Tensor, dtype: torch.dtype = torch.float32):
        return liger_rope_tables(ids, self.axes_dim, self.theta, dtype)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """x / rms(x) (statistics in float32, or float64 for float64 x; eps 1e-6), cast back to
    x's dtype, times ``scale``."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xw = x.to(_work_dtype(x.dtype))
        rrms = torch.rsqrt(torch.mean(xw * xw, dim=-1, keepdim=True) + 1e-6)
        return (xw * rrms).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """The q/k/v projections (``qkv`` or ``q_proj``/``k_proj``/``v_proj``), the QK norm and the
    output ``proj`` of one stream of a double block."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 fused_qkv: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.fused_qkv = fused_qkv
        head_dim = dim // num_heads
        if fused_qkv:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.norm = QKNorm(head_dim)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Modulated tokens [B, L, C] -> normed q, k and v, each [B, H, L, D]."""
        h = self.num_heads
        if self.fused_qkv:
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (split_heads(p(x), h) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.norm(q, k, v)
        return q, k, v

    def forward(self, x: Tensor, pe, backend: str = "auto") -> Tensor:
        q, k, v = self.qkv_heads(x)
        return self.proj(merge_heads(attention_heads(q, k, v, pe, backend)))


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """vec [B, C] -> shift, scale, gate [B, 1, C] (two sets for a double block)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor):
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), (ModulationOut(*out[3:]) if self.is_double else None)


def _backend(block) -> str:
    return getattr(block, "attn_backend", "auto")


class DoubleStreamBlockProcessor:
    """The computation of a :class:`DoubleStreamBlock`: each stream modulated and projected
    separately, one joint attention over [txt; img] tokens, then per-stream gated residuals of
    ``img_attn.proj`` / ``txt_attn.proj`` and ``img_mlp`` / ``txt_mlp`` (module calls).

    :meth:`joint_attention` is the step a distributed processor replaces."""

    def joint_attention(self, block, q: Tensor, k: Tensor, v: Tensor, pe) -> Tensor:
        """q, k, v [B, H, Lt+Li, D] of the [txt; img] tokens -> attention output [B, Lt+Li, C]."""
        return merge_heads(attention_heads(q, k, v, pe, _backend(block)))

    def __call__(self, attn, img: Tensor, txt: Tensor, vec: Tensor, pe) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = attn.img_mod(vec)
        txt_mod1, txt_mod2 = attn.txt_mod(vec)

        img_modulated = (1 + img_mod1.scale) * attn.img_norm1(img) + img_mod1.shift
        img_q, img_k, img_v = attn.img_attn.qkv_heads(img_modulated)
        txt_modulated = (1 + txt_mod1.scale) * attn.txt_norm1(txt) + txt_mod1.shift
        txt_q, txt_k, txt_v = attn.txt_attn.qkv_heads(txt_modulated)

        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        out = self.joint_attention(attn, q, k, v, pe)
        txt_len = txt.shape[1]
        txt_attn, img_attn = out[:, :txt_len], out[:, txt_len:]

        img = img + img_mod1.gate * attn.img_attn.proj(img_attn)
        img = img + img_mod2.gate * attn.img_mlp(
            (1 + img_mod2.scale) * attn.img_norm2(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * attn.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * attn.txt_mlp(
            (1 + txt_mod2.scale) * attn.txt_norm2(txt) + txt_mod2.shift)
        return img, txt


class DoubleStreamBlock(nn.Module):
    """Double-stream block: separate weights for image and text tokens, joint attention.

    Attributes as upstream: ``num_heads``, ``hidden_size``, ``head_dim`` (plus ``fused_qkv``,
    ``mlp_hidden_dim``); submodules ``img_mod, img_norm1, img_attn, img_norm2, img_mlp`` and
    the same ``txt_*``; ``processor`` computes :meth:`forward`."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float,
                 qkv_bias: bool = False, fused_qkv: bool = True):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.head_dim = hidden_size // num_heads
        self.mlp_hidden_dim = mlp_hidden_dim
        self.fused_qkv = fused_qkv
        self.attn_backend = "auto"
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(hidden_size, double=True))
            self.add_module(f"{stream}_norm1", nn.LayerNorm(hidden_size, elementwise_affine=False,
                                                            eps=1e-6))
            self.add_module(f"{stream}_attn", SelfAttention(hidden_size, num_heads, qkv_bias,
                                                            fused_qkv))
            self.add_module(f"{stream}_norm2", nn.LayerNorm(hidden_size, elementwise_affine=False,
                                                            eps=1e-6))
            self.add_module(f"{stream}_mlp", nn.Sequential(
                nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
                nn.GELU(approximate="tanh"),
                nn.Linear(mlp_hidden_dim, hidden_size, bias=True)))
        self.set_processor(DoubleStreamBlockProcessor())

    def set_processor(self, processor) -> None:
        self.processor = processor

    def get_processor(self):
        return self.processor

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe, **kwargs):
        return self.processor(self, img, txt, vec, pe)


class SingleStreamBlockProcessor:
    """The computation of a :class:`SingleStreamBlock` on x = [txt; img] tokens: ``linear1``
    (or ``q_proj``, ``k_proj``, ``v_mlp``) gives q, k, v and the MLP input, attention, then
    ``linear2`` of [attention | mlp_act(mlp)] as a gated residual.

    :meth:`joint_attention` is the step a distributed processor replaces."""

    def joint_attention(self, block, q: Tensor, k: Tensor, v: Tensor, pe) -> Tensor:
        return merge_heads(attention_heads(q, k, v, pe, _backend(block)))

    def __call__(self, attn, x: Tensor, vec: Tensor, pe) -> Tensor:
        mod, _ = attn.modulation(vec)
        x_mod = (1 + mod.scale) * attn.pre_norm(x) + mod.shift
        h = attn.num_heads
        if attn.fused_qkv:
            qkv, mlp = torch.split(attn.linear1(x_mod), [3 * attn.hidden_size,
                                                         attn.mlp_hidden_dim], dim=-1)
            b, n, _ = qkv.shape
            q, k, v = qkv.view(b, n, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = split_heads(attn.q_proj(x_mod), h)
            k = split_heads(attn.k_proj(x_mod), h)
            v, mlp = torch.split(attn.v_mlp(x_mod), [attn.hidden_size, attn.mlp_hidden_dim],
                                 dim=-1)
            v = split_heads(v, h)
        q, k = attn.norm(q, k, v)
        out = self.joint_attention(attn, q, k, v, pe)
        out = attn.linear2(torch.cat((out, attn.mlp_act(mlp)), 2))
        return x + mod.gate * out


class SingleStreamBlock(nn.Module):
    """Single-stream block (parallel attention and MLP on the joint [txt; img] tokens).

    Attributes as upstream: ``hidden_dim``, ``hidden_size``, ``num_heads``, ``head_dim``,
    ``scale``, ``fused_qkv``, ``mlp_hidden_dim``; submodules ``linear1`` (or ``q_proj``,
    ``k_proj``, ``v_mlp``), ``linear2``, ``norm``, ``pre_norm``, ``mlp_act``, ``modulation``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 qk_scale: Optional[float] = None, fused_qkv: bool = True):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.fused_qkv = fused_qkv
        self.attn_backend = "auto"
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        if fused_qkv:
            self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        else:
            self.q_proj = nn.Linear(hidden_size, hidden_size)
            self.k_proj = nn.Linear(hidden_size, hidden_size)
            self.v_mlp = nn.Linear(hidden_size, hidden_size + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(self.head_dim)
        self.hidden_size = hidden_size
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)
        self.set_processor(SingleStreamBlockProcessor())

    def set_processor(self, processor) -> None:
        self.processor = processor

    def get_processor(self):
        return self.processor

    def forward(self, x: Tensor, vec: Tensor, pe, **kwargs) -> Tensor:
        return self.processor(self, x, vec, pe)


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(),
                                              nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)


# ------------------------------------------------------------- distributed processors
def sequence_parallel_attention(state, block, q, k, v, pe) -> Tensor:
    """Joint attention of this rank's local [txt; img] tokens q, k, v [B, H, n_local, D]
    under the plan of the forward in progress, ``state.plan`` (plain :func:`attention` when
    there is none) -> [B, n_local, C]. A custom processor on a model with sequence
    parallelism calls this with ``model.sp_state`` where the plain one calls attention."""
    plan = state.plan
    if plan is None:
        return merge_heads(attention_heads(q, k, v, pe, _backend(block)))
    q, k, v = plan.to_global(q, k, v)
    return merge_heads(plan.to_local(attention_heads(q, k, v, pe, _backend(block))))


class DistributedDoubleStreamBlockProcessor(DoubleStreamBlockProcessor):
    """Ulysses form of :class:`DoubleStreamBlockProcessor`: the block gets this rank's local
    [txt; img] tokens; q/k/v are exchanged all-to-all (heads scattered, tokens gathered into
    the global [txt; img] order, padding dropped) for attention with the global rotary tables,
    and the output is exchanged back. Without an active plan (one process, or outside the
    model's forward) it computes exactly what the plain processor does."""

    def __init__(self, state: ulysses.SequenceParallelState):
        self.state = state

    def joint_attention(self, block, q, k, v, pe):
        return sequence_parallel_attention(self.state, block, q, k, v, pe)


class DistributedSingleStreamBlockProcessor(SingleStreamBlockProcessor):
    """Ulysses form of :class:`SingleStreamBlockProcessor` (same exchange as the double one)."""

    def __init__(self, state: ulysses.SequenceParallelState):
        self.state = state

    def joint_attention(self, block, q, k, v, pe):
        return sequence_parallel_attention(self.state, block, q, k, v, pe)


# --------------------------------------------------------------------------- model
def token_grid(img_ids: Tensor, num_tokens: int, grid_size=None) -> tuple[int, int, int]:
    """The latent token grid (T, H, W): ``grid_size`` when given, else max + 1 of each axis of
    ``img_ids`` [B, L, 3] (one device-to-host read). Must hold T*H*W == ``num_tokens``."""
    if grid_size is not None:
        grid = tuple(int(v) for v in grid_size)
        what = f"grid_size={tuple(grid_size)!r}"
    else:
        if img_ids.shape[-1] != 3:
            raise ValueError(f"img_ids has {img_ids.shape[-1]} axes; sequence parallelism "
                             "needs (t, h, w) ids, accepted: img_ids [B, L, 3] or grid_size")
        grid = tuple(int(v) + 1 for v in img_ids.reshape(-1, 3).amax(0).round().tolist())
        what = f"img_ids (max + 1 per axis = {grid})"
    if len(grid) != 3 or min(grid) < 1 or grid[0] * grid[1] * grid[2] != num_tokens:
        raise ValueError(f"{what} does not describe the {num_tokens} image tokens; accepted: a "
                         f"(T, H, W) grid with T*H*W == {num_tokens}, tokens in (t h w) order")
    return grid


class MMDiTModel(nn.Module):
    """Open-Sora 2.0 MMDiT.

    ``forward(img, img_ids, txt, txt_ids, timesteps, y_vec, cond=None, guidance=None,
    **kwargs)`` as upstream: ``img`` packed latents [B, L, in_channels] in (t h w) order,
    ``img_ids`` [B, L, 3] their (t, h, w) positions, ``txt`` T5 features [B, Lt,
    context_in_dim], ``txt_ids`` [B, Lt, 3] (zeros upstream; both ids may have batch 1),
    ``timesteps`` [B] in [0, 1], ``y_vec`` CLIP vector [B, vec_in_dim], ``cond`` [B, L,
    in_channels + patch_size**2] (``cond_embed``), ``guidance`` [B] (``guidance_embed``).
    Returns [B, L, in_channels] in the model's dtype. Inputs are cast to the model's dtype.
    Other keywords are ignored, as upstream does, except ``grid_size=(T, H, W)`` (used by
    sequence parallelism instead of reading the grid from ``img_ids``).

    Sequence parallelism (``enable_sequence_parallelism=True``; the group is
    :func:`opensora_duca.parallel.get_sequence_parallel_group`, ``num_heads`` must be
    divisible by its size P): image tokens are sharded by whole latent rows of every frame
    (rank r holds rows [r*Hl, (r+1)*Hl) of each frame, Hl = ceil(H/P), H padded with zero
    rows), text tokens in contiguous chunks of ceil(Lt/P) (padded); blocks run on local
    tokens and only attention sees all of them (see :mod:`opensora_duca.parallel.ulysses`).
    The output is gathered to [B, L, C] on every rank. Inference only: the collectives do not
    carry gradients.
    """

    config_class = MMDiTConfig

    def __init__(self, config: MMDiTConfig, attn_backend: str = "auto",
                 enable_sequence_parallelism: bool = False):
        super().__init__()
        if not isinstance(config, MMDiTConfig):
            raise ValueError(f"MMDiTModel config={type(config).__name__} is not accepted; "
                             "accepted: an MMDiTConfig")
        config.validate()
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = self.in_channels
        self.patch_size = config.patch_size
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads
        pe_dim = config.hidden_size // config.num_heads
        pe_cls = LigerEmbedND if config.use_liger_rope else EmbedND
        self.pe_embedder = pe_cls(dim=pe_dim, theta=config.theta, axes_dim=config.axes_dim)

        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(config.vec_in_dim, self.hidden_size)
        self.guidance_in = (MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
                            if config.guidance_embed else nn.Identity())
        self.cond_in = (nn.Linear(self.in_channels + self.patch_size ** 2, self.hidden_size,
                                  bias=True) if config.cond_embed else nn.Identity())
        self.txt_in = nn.Linear(config.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList([
            DoubleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=config.mlp_ratio,
                              qkv_bias=config.qkv_bias, fused_qkv=config.fused_qkv)
            for _ in range(config.depth)])
        self.single_blocks = nn.ModuleList([
            SingleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=config.mlp_ratio,
                              fused_qkv=config.fused_qkv)
            for _ in range(config.depth_single_blocks)])
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)
        self.initialize_weights()

        self.sp_state = ulysses.SequenceParallelState()
        self._sp_enabled = False
        self.attn_backend = attn_backend
        self.enable_sequence_parallelism = enable_sequence_parallelism

    def initialize_weights(self):
        """Upstream's: the conditioning projection starts at zero."""
        if self.config.cond_embed:
            nn.init.zeros_(self.cond_in.weight)
            nn.init.zeros_(self.cond_in.bias)

    # ------------------------------------------------------------- options
    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, name: str) -> None:
        self._attn_backend = check_backend(name)
        for block in [*self.double_blocks, *self.single_blocks]:
            block.attn_backend = name

    @property
    def enable_sequence_parallelism(self) -> bool:
        return self._sp_enabled

    @enable_sequence_parallelism.setter
    def enable_sequence_parallelism(self, value: bool) -> None:
        """Setting it installs the distributed (True) or plain (False) processors on every
        block, replacing whatever processor a block had."""
        if not isinstance(value, bool):
            raise ValueError(f"enable_sequence_parallelism={value!r} is not accepted; "
                             "accepted: True or False")
        self._sp_enabled = value
        for block in self.double_blocks:
            block.set_processor(DistributedDoubleStreamBlockProcessor(self.sp_state) if value
                                else DoubleStreamBlockProcessor())
        for block in self.single_blocks:
            block.set_processor(DistributedSingleStreamBlockProcessor(self.sp_state) if value
                                else SingleStreamBlockProcessor())

    def sequence_parallel_group(self):
        """The sequence-parallel process group this model uses now (None when off or with one
        rank)."""
        if not self.enable_sequence_parallelism:
            return None
        group = sp.get_sequence_parallel_group()
        p = sp.group_size(group)
        if p > 1 and self.num_heads % p:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by the sequence-"
                             f"parallel group size {p}; choose a group size that divides it")
        return group if p > 1 else None

    # ------------------------------------------------------------- forward
    def _check_inputs(self, img, img_ids, txt, txt_ids, timesteps, y_vec, cond, guidance):
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img {tuple(img.shape)} and txt {tuple(txt.shape)}: accepted: "
                             "3-d tensors [B, L, C]")
        b, n, c = img.shape
        n_axes = len(self.config.axes_dim)
        bi = 1 if img_ids.shape[0] == 1 else b  # ids of batch 1 are shared by every sample
        checks = (
            ("img", img, (b, n, self.in_channels)),
            ("img_ids", img_ids, (bi, n, n_axes)),
            ("txt", txt, (b, txt.shape[1], self.config.context_in_dim)),
            ("txt_ids", txt_ids, (bi, txt.shape[1], n_axes)),
            ("y_vec", y_vec, (b, self.config.vec_in_dim)),
        )
        for key, val, want in checks:
            if tuple(val.shape) != want:
                raise ValueError(f"{key}: expected shape {want}, got {tuple(val.shape)}")
        if timesteps.numel() != b:
            raise ValueError(f"timesteps: expected {b} values, got shape "
                             f"{tuple(timesteps.shape)}")
        if self.config.cond_embed:
            want = (b, n, self.in_channels + self.patch_size ** 2)
            if cond is None or tuple(cond.shape) != want:
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"cond={got}: this model has cond_embed=True; accepted: the "
                                 f"conditioning latents {want}")
        if self.config.guidance_embed and (guidance is None or guidance.numel() != b):
            got = None if guidance is None else tuple(guidance.shape)
            raise ValueError(f"guidance={got}: this model has guidance_embed=True; accepted: "
                             f"{b} guidance strengths")

    def prepare_block_inputs(self, img, img_ids, txt, txt_ids, timesteps, y_vec, cond=None,
                             guidance=None):
        """Embed the inputs: img [B, L, C], txt [B, Lt, C], vec [B, C] and the rotary tables
        ``pe`` of the [txt; img] positions (a tensor, or (cos, sin) with liger rope)."""
        self._check_inputs(img, img_ids, txt, txt_ids, timesteps, y_vec, cond, guidance)
        dtype = self.img_in.weight.dtype
        img = self.img_in(img.to(dtype))
        if self.config.cond_embed:
            img = img + self.cond_in(cond.to(dtype))
        vec = self.time_in(timestep_embedding(timesteps.reshape(-1), 256).to(dtype))
        if self.config.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance.reshape(-1), 256).to(dtype))
        vec = vec + self.vector_in(y_vec.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        ids = torch.cat((txt_ids, img_ids), dim=1)
        pe = self.pe_embedder(ids, _work_dtype(dtype))
        return img, txt, vec, pe

    def _ckpt_counts(self) -> tuple[int, int]:
        g = self.config.grad_ckpt_settings
        if g is None or not (self.training and torch.is_grad_enabled()):
            return 0, 0
        return int(g[0]), int(g[1])

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor,
                timesteps: Tensor, y_vec: Tensor, cond: Optional[Tensor] = None,
                guidance: Optional[Tensor] = None, **kwargs) -> Tensor:
        img, txt, vec, pe = self.prepare_block_inputs(img, img_ids, txt, txt_ids, timesteps,
                                                      y_vec, cond, guidance)
        group = self.sequence_parallel_group()
        plan = None
        if group is not None:
            grid = token_grid(img_ids, img.shape[1], kwargs.get("grid_size"))
            plan = ulysses.UlyssesPlan(group, txt.shape[1], grid, img.device)
            img, txt = plan.shard_img(img), plan.shard_txt(txt)
        n_double, n_single = self._ckpt_counts()
        self.sp_state.plan = plan
        try:
            for i, block in enumerate(self.double_blocks):
                if i < n_double:
                    img, txt = checkpoint(block, img, txt, vec, pe,
                                                                 use_reentrant=False)
                else:
                    img, txt = block(img, txt, vec, pe)
            txt_len = txt.shape[1]
            x = torch.cat((txt, img), 1)
            for i, block in enumerate(self.single_blocks):
                if i < n_single:
                    x = checkpoint(block, x, vec, pe, use_reentrant=False)
                else:
                    x = block(x, vec, pe)
            img = self.final_layer(x[:, txt_len:], vec)
            if plan is not None:
                img = plan.gather_img(img)
        finally:  # hold no process group between calls
            self.sp_state.plan = None
        return img


# --------------------------------------------------------------------------- builders
def _resolve_device(device_map) -> torch.device:
    if device_map is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"model device_map={device_map!r} is not accepted; accepted: a "
                         "torch.device or a device name such as 'cuda', 'cuda:0', 'cpu'") from None


def load_mmdit_checkpoint(model: MMDiTModel, path: str, strict: bool = False) -> list:
    """Load a local checkpoint (``.safetensors`` file or folder; nothing is downloaded).

    ``strict=True``: any missing or unexpected key or shape mismatch raises, listing them
    (:func:`opensora_duca.models.checkpoint.load_checkpoint`). ``strict=False`` (upstream's
    default): shape mismatches raise; missing and unexpected keys are listed in a warning,
    and returned, and the rest is loaded (missing weights keep their initial values)."""
    from .checkpoint import load_checkpoint, read_state_dict, resolve_checkpoint_path
    if strict:
        load_checkpoint(model, path)
        return []
    path = resolve_checkpoint_path(path)
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if bad:
        raise RuntimeError(f"checkpoint {path!r} does not match MMDiTModel: shape mismatches: "
                           + ", ".join(f"{k} {tuple(sd[k].shape)} vs model "
                                       f"{tuple(own[k].shape)}" for k in bad))
    lines = []
    if missing:
        lines.append(f"missing keys (left at their initial values): {', '.join(missing)}")
    if unexpected:
        lines.append(f"unexpected keys (ignored): {', '.join(unexpected)}")
    if lines:
        warnings.warn(f"checkpoint {path!r} does not match MMDiTModel (strict_load=False): "
                      + "; ".join(lines), stacklevel=2)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items() if k in own},
                          strict=False)
    return missing + unexpected


_CONFIG_FIELDS = tuple(f.name for f in fields(MMDiTConfig))
_BUILDER_OPTIONS = ("device_map", "torch_dtype", "strict_load", "attn_backend",
                    "enable_sequence_parallelism")


def build_mmdit(cache_dir: Optional[str] = None, from_pretrained: Optional[str] = None,
                device_map=None, torch_dtype=torch.bfloat16, strict_load: bool = False,
                attn_backend: str = "auto", enable_sequence_parallelism: bool = False,
                **kwargs) -> MMDiTModel:
    """Upstream's ``flux`` builder: the :class:`MMDiTConfig` fields as keywords, plus
    ``from_pretrained`` (a local ``.safetensors`` file or folder, see
    :func:`load_mmdit_checkpoint`; nothing is downloaded), ``cache_dir`` (kept in the config,
    unused), ``device_map`` (a device; default CUDA when available, else CPU), ``torch_dtype``
    (default bf16, as upstream; a torch.dtype or a name such as "bf16"), ``strict_load``,
    ``attn_backend`` and ``enable_sequence_parallelism``."""
    unknown = sorted(k for k in kwargs if k not in _CONFIG_FIELDS)
    if unknown:
        accepted = sorted(set(_CONFIG_FIELDS) | set(_BUILDER_OPTIONS))
        raise ValueError(f"flux model got unknown option(s) {unknown}; accepted: {accepted}")
    if not isinstance(strict_load, bool):
        raise ValueError(f"model strict_load={strict_load!r} is not accepted; accepted: True "
                         "or False")
    dtype = resolve_dtype(torch_dtype, "torch_dtype")
    device = _resolve_device(device_map)
    config = MMDiTConfig(from_pretrained=from_pretrained, cache_dir=cache_dir, **kwargs)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype directly (as upstream)
    try:
        with torch.device(device):
            model = MMDiTModel(config, attn_backend=attn_backend,
                               enable_sequence_parallelism=enable_sequence_parallelism)
    finally:
        torch.set_default_dtype(default)
    model = model.to(dtype)
    if from_pretrained:
        load_mmdit_checkpoint(model, from_pretrained, strict=strict_load)
    return model.eval()


MODELS.register_module(name="flux", module=build_mmdit)

#: upstream's configs/diffusion/inference/256px.py (and 768px.py) model dict, without
#: ``from_pretrained``
OPEN_SORA_V2 = dict(guidance_embed=False, fused_qkv=False, use_liger_rope=True, in_channels=64,
                    vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                    num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                    theta=10_000, qkv_bias=True, cond_embed=True)

PRESETS = {
    "OpenSora-v2-MMDiT": OPEN_SORA_V2,
    # CPU-sized model of the same class (published layout: split qkv, liger rope, cond_in)
    "MMDiT-cpu": dict(OPEN_SORA_V2, vec_in_dim=32, context_in_dim=32, hidden_size=64,
                      num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
                      torch_dtype=torch.float32, device_map="cpu"),
}


def _register(name: str, preset: dict):
    def builder(**kwargs) -> MMDiTModel:
        return build_mmdit(**dict(preset, **kwargs))
    builder.__name__ = name.replace("-", "_")
    builder.__doc__ = f"Build {name} ({preset}); keyword arguments override the preset."
    MODELS.register_module(name=name, module=builder)


for _name, _preset in PRESETS.items():
    _register(_name, _preset)
