"""A test double with the *structure* of upstream Open-Sora 2.0's MMDiT (``opensora/models/
mmdit``: model.py, layers.py, math.py, distributed.py), to check opensora_duca's own
:mod:`opensora_duca.models.mmdit` and the cache plugin against an upstream-shaped object.

Written for these tests from upstream's equations and names; it imports nothing from
``opensora_duca``, nor colossalai, flash_attn or liger_kernel:

- classes named as upstream's (``MMDiTConfig``, ``MMDiTModel``, ``DoubleStreamBlock``,
  ``SingleStreamBlock``, ``DoubleStreamBlockProcessor``, ``SingleStreamBlockProcessor``,
  ``EmbedND``, ``LigerEmbedND``, ...) with upstream's parameter names and shapes;
- the model sets ``self.forward = self.forward_ckpt`` on the instance in ``__init__``;
- blocks delegate to ``self.processor(self, ...)``;
- numerics as upstream's CUDA code computes them: interleaved rope tables from float64
  frequencies cast to float32, rotation in float32; the Liger rope (llama rotate-half,
  cos/sin in float32 from the concatenated per-axis halves repeated twice, only the first
  half read) in plain torch; RMS statistics in float32; timestep embedding in float32;
  attention through ``scaled_dot_product_attention`` in place of flash-attn;
- :func:`shard_mmdit` does what upstream's booster (``MMDiTPolicy``) does for Ulysses
  sequence parallelism: every block's processor becomes a distributed one (all-to-all of
  q/k/v: heads scattered, sequence gathered) and the model's ``forward`` becomes
  ``functools.partial(mmdit_model_forward, model, shard_config=...)``, which splits the
  concatenated [txt; img] sequence into P equal contiguous chunks (its length must be
  divisible by P, as upstream asserts) and gathers the image output. Forward only (gloo or
  any backend with ``all_to_all_single`` / ``all_gather``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


# ------------------------------------------------------------------------ math.py
def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    out = torch.einsum("...n,d->...nd", pos, omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    out = rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2)
    return out.float()


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor):
    def one(x):
        x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        out = freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]
        return out.reshape(*x.shape).type_as(x)
    return one(xq), one(xk)


def liger_rope(pos: Tensor, dim: int, theta: int):
    scale = torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    out = torch.einsum("...n,d->...nd", pos, omega)
    return out.cos(), out.sin()


def liger_rope_apply(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor):
    """What Liger's rope kernel computes for q, k [B, H, L, D] and cos, sin [B or 1, L, D]:
    only the first D/2 table entries are read; (x1, x2) halves become
    (x1 cos - x2 sin, x2 cos + x1 sin), in the tables' dtype, stored in x's dtype."""
    half = q.shape[-1] // 2
    c = cos[..., :half][:, None]
    s = sin[..., :half][:, None]

    def one(x):
        x1, x2 = x[..., :half].to(c.dtype), x[..., half:].to(c.dtype)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    return one(q), one(k)


def _rope_both(q, k, pe):
    if isinstance(pe, torch.Tensor):
        return apply_rope(q, k, pe)
    cos, sin = pe
    return liger_rope_apply(q, k, cos, sin)


def attention(q: Tensor, k: Tensor, v: Tensor, pe) -> Tensor:
    q, k = _rope_both(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return rearrange(x, "B H L D -> B L (H D)")


# ------------------------------------------------------------------------ layers.py
class EmbedND(nn.Module):
    def __init__(self, dim: int, theta: int, axes_dim: List[int]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        n_axes = ids.shape[-1]
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(n_axes)],
                        dim=-3)
        return emb.unsqueeze(1)


class LigerEmbedND(nn.Module):
    def __init__(self, dim: int, theta: int, axes_dim: List[int]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids: Tensor):
        n_axes = ids.shape[-1]
        cos_list, sin_list = [], []
        for i in range(n_axes):
            cos, sin = liger_rope(ids[..., i], self.axes_dim[i], self.theta)
            cos_list.append(cos)
            sin_list.append(sin)
        cos_emb = torch.cat(cos_list, dim=-1).repeat(1, 1, 2).contiguous()
        sin_emb = torch.cat(sin_list, dim=-1).repeat(1, 1, 2).contiguous()
        return cos_emb, sin_emb


def timestep_embedding(t: Tensor, dim, max_period=10000, time_factor: float = 1000.0):
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half,
                                                           dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        embedding = embedding.to(t)
    return embedding


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor):
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor):
        q = self.query_norm(q)
        k = self.key_norm(k)
        return q.to(v), k.to(v)


class SelfAttention(nn.Module):
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


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor):
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def _stream_qkv(attn_mod: SelfAttention, x: Tensor, num_heads: int, head_dim: int):
    """Upstream's per-stream q/k/v preparation ([B, H, L, D] each, QK-normed)."""
    if attn_mod.fused_qkv:
        qkv = attn_mod.qkv(x)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=num_heads, D=head_dim)
    else:
        q = rearrange(attn_mod.q_proj(x), "B L (H D) -> B L H D", H=num_heads)
        k = rearrange(attn_mod.k_proj(x), "B L (H D) -> B L H D", H=num_heads)
        v = rearrange(attn_mod.v_proj(x), "B L (H D) -> B L H D", H=num_heads)
    q, k = attn_mod.norm(q, k, v)
    if not attn_mod.fused_qkv:
        q, k, v = (rearrange(t, "B L H D -> B H L D") for t in (q, k, v))
    return q, k, v


class DoubleStreamBlockProcessor:
    def attend(self, q, k, v, pe):
        return attention(q, k, v, pe=pe)

    def __call__(self, attn, img: Tensor, txt: Tensor, vec: Tensor, pe):
        img_mod1, img_mod2 = attn.img_mod(vec)
        txt_mod1, txt_mod2 = attn.txt_mod(vec)
        img_modulated = (1 + img_mod1.scale) * attn.img_norm1(img) + img_mod1.shift
        img_q, img_k, img_v = _stream_qkv(attn.img_attn, img_modulated, attn.num_heads,
                                          attn.head_dim)
        txt_modulated = (1 + txt_mod1.scale) * attn.txt_norm1(txt) + txt_mod1.shift
        txt_q, txt_k, txt_v = _stream_qkv(attn.txt_attn, txt_modulated, attn.num_heads,
                                          attn.head_dim)
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn1 = self.attend(q, k, v, pe)
        txt_attn, img_attn = attn1[:, :txt_q.shape[2]], attn1[:, txt_q.shape[2]:]
        img = img + img_mod1.gate * attn.img_attn.proj(img_attn)
        img = img + img_mod2.gate * attn.img_mlp((1 + img_mod2.scale) * attn.img_norm2(img)
                                                 + img_mod2.shift)
        txt = txt + txt_mod1.gate * attn.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * attn.txt_mlp((1 + txt_mod2.scale) * attn.txt_norm2(txt)
                                                 + txt_mod2.shift)
        return img, txt


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float,
                 qkv_bias: bool = False, fused_qkv: bool = True):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.head_dim = hidden_size // num_heads

        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias, fused_qkv)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
                                     nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden_dim, hidden_size, bias=True))

        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias, fused_qkv)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
                                     nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden_dim, hidden_size, bias=True))
        self.set_processor(DoubleStreamBlockProcessor())

    def set_processor(self, processor) -> None:
        self.processor = processor

    def get_processor(self):
        return self.processor

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe, **kwargs):
        return self.processor(self, img, txt, vec, pe)


class SingleStreamBlockProcessor:
    def attend(self, q, k, v, pe):
        return attention(q, k, v, pe=pe)

    def __call__(self, attn, x: Tensor, vec: Tensor, pe) -> Tensor:
        mod, _ = attn.modulation(vec)
        x_mod = (1 + mod.scale) * attn.pre_norm(x) + mod.shift
        if attn.fused_qkv:
            qkv, mlp = torch.split(attn.linear1(x_mod),
                                   [3 * attn.hidden_size, attn.mlp_hidden_dim], dim=-1)
            q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=attn.num_heads)
        else:
            q = rearrange(attn.q_proj(x_mod), "B L (H D) -> B L H D", H=attn.num_heads)
            k = rearrange(attn.k_proj(x_mod), "B L (H D) -> B L H D", H=attn.num_heads)
            v, mlp = torch.split(attn.v_mlp(x_mod), [attn.hidden_size, attn.mlp_hidden_dim],
                                 dim=-1)
            v = rearrange(v, "B L (H D) -> B L H D", H=attn.num_heads)
        q, k = attn.norm(q, k, v)
        if not attn.fused_qkv:
            q, k, v = (rearrange(t, "B L H D -> B H L D") for t in (q, k, v))
        attn_1 = self.attend(q, k, v, pe)
        output = attn.linear2(torch.cat((attn_1, attn.mlp_act(mlp)), 2))
        return x + mod.gate * output


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 qk_scale: Optional[float] = None, fused_qkv: bool = True):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.fused_qkv = fused_qkv
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


# ------------------------------------------------------------------------ model.py
@dataclass
class MMDiTConfig:
    model_type = "MMDiT"
    from_pretrained: Optional[str]
    cache_dir: Optional[str]
    in_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: List[int]
    theta: int
    qkv_bias: bool
    guidance_embed: bool
    cond_embed: bool = False
    fused_qkv: bool = True
    grad_ckpt_settings: Optional[tuple] = None
    use_liger_rope: bool = False
    patch_size: int = 2


class MMDiTModel(nn.Module):
    config_class = MMDiTConfig

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = self.in_channels
        self.patch_size = config.patch_size
        if config.hidden_size % config.num_heads != 0:
            raise ValueError("hidden_size must be divisible by num_heads")
        pe_dim = config.hidden_size // config.num_heads
        if sum(config.axes_dim) != pe_dim:
            raise ValueError("axes_dim must sum to the head dim")
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads
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
        if config.cond_embed:
            nn.init.zeros_(self.cond_in.weight)
            nn.init.zeros_(self.cond_in.bias)
        self.forward = self.forward_ckpt  # on the instance, as upstream

    def prepare_block_inputs(self, img, img_ids, txt, txt_ids, timesteps, y_vec, cond=None,
                             guidance=None):
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("Input img and txt tensors must have 3 dimensions.")
        img = self.img_in(img)
        if self.config.cond_embed:
            if cond is None:
                raise ValueError("Didn't get conditional input for conditional model.")
            img = img + self.cond_in(cond)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("Didn't get guidance strength for guidance distilled model.")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y_vec)
        txt = self.txt_in(txt)
        ids = torch.cat((txt_ids, img_ids), dim=1)
        pe = self.pe_embedder(ids)
        return img, txt, vec, pe

    def forward_ckpt(self, img, img_ids, txt, txt_ids, timesteps, y_vec, cond=None,
                     guidance=None, **kwargs):
        img, txt, vec, pe = self.prepare_block_inputs(img, img_ids, txt, txt_ids, timesteps,
                                                      y_vec, cond, guidance)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec, pe)
        img = img[:, txt.shape[1]:, ...]
        return self.final_layer(img, vec)


# ------------------------------------------------------------------------ distributed.py
@dataclass
class ShardConfig:
    """The fields of colossalai's ShardConfig that the MMDiT policy reads."""
    sequence_parallel_process_group: object = None
    enable_sequence_parallelism: bool = True
    sequence_parallelism_mode: str = "all_to_all"

    @property
    def sequence_parallel_size(self) -> int:
        return dist.get_world_size(self.sequence_parallel_process_group)


def all_to_all_comm(x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
    p = dist.get_world_size(group)
    send = torch.stack([c.contiguous() for c in x.chunk(p, dim=scatter_dim)])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


def split_forward_gather_backward_var_len(x: Tensor, dim: int, group, splits: List[int]):
    return torch.split(x, splits, dim=dim)[dist.get_rank(group)].clone()


def gather_forward_split_backward_var_len(x: Tensor, dim: int, group, splits: List[int]):
    """All-gather chunks of different lengths along ``dim`` (padded to the longest for the
    collective, which gloo needs equal-sized, then trimmed)."""
    longest = max(splits)
    pad = [0, 0] * (x.ndim - 1 - dim) + [0, longest - x.shape[dim]]
    x = F.pad(x, pad).contiguous()
    parts = [torch.empty_like(x) for _ in splits]
    dist.all_gather(parts, x, group=group)
    return torch.cat([t.narrow(dim, 0, s) for t, s in zip(parts, splits)], dim=dim)


class DistributedDoubleStreamBlockProcessor(DoubleStreamBlockProcessor):
    def __init__(self, shard_config: ShardConfig):
        self.shard_config = shard_config

    def attend(self, q, k, v, pe):
        cfg = self.shard_config
        if not cfg.enable_sequence_parallelism:
            return attention(q, k, v, pe=pe)
        group = cfg.sequence_parallel_process_group
        assert q.shape[1] % cfg.sequence_parallel_size == 0
        q, k, v = (all_to_all_comm(t, group, scatter_dim=1, gather_dim=2) for t in (q, k, v))
        out = attention(q, k, v, pe=pe)
        return all_to_all_comm(out, group, scatter_dim=1, gather_dim=2)


class DistributedSingleStreamBlockProcessor(SingleStreamBlockProcessor):
    def __init__(self, shard_config: ShardConfig):
        self.shard_config = shard_config

    attend = DistributedDoubleStreamBlockProcessor.attend


def mmdit_model_forward(self: MMDiTModel, img, img_ids, txt, txt_ids, timesteps, y_vec,
                        cond=None, guidance=None, shard_config: ShardConfig = None, **kwargs):
    txt_len = txt.shape[1]
    img, txt, vec, pe = self.prepare_block_inputs(img, img_ids, txt, txt_ids, timesteps, y_vec,
                                                  cond, guidance)
    old = shard_config.enable_sequence_parallelism
    group = shard_config.sequence_parallel_process_group
    p = shard_config.sequence_parallel_size
    total = txt.shape[1] + img.shape[1]
    assert total % p == 0, f"Expected {total} % {p} == 0"
    mask = torch.zeros(total, dtype=torch.bool)
    mask[txt.shape[1]:] = True
    mask_chunks = mask.chunk(p)
    cur_mask = mask_chunks[dist.get_rank(group)]
    txt_splits = [len(c) - int(c.sum()) for c in mask_chunks]
    img_splits = [int(c.sum()) for c in mask_chunks]
    if 0 in img_splits:  # upstream: sequence parallelism off for this call
        shard_config.enable_sequence_parallelism = False
    else:
        img = split_forward_gather_backward_var_len(img, 1, group, img_splits)
        txt = split_forward_gather_backward_var_len(txt, 1, group, txt_splits)
    try:
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec, pe)
        if shard_config.enable_sequence_parallelism:
            img = img[:, cur_mask.to(img.device)]
        else:
            img = img[:, txt_len:]
        img = self.final_layer(img, vec)
        if shard_config.enable_sequence_parallelism:
            img = gather_forward_split_backward_var_len(img, 1, group, img_splits)
    finally:
        shard_config.enable_sequence_parallelism = old
    return img


def shard_mmdit(model: MMDiTModel, group=None) -> MMDiTModel:
    """What upstream's booster does with MMDiTPolicy for Ulysses sequence parallelism (in
    place): distributed processors on every block, ``model.forward`` replaced by a partial of
    :func:`mmdit_model_forward`. ``group`` defaults to WORLD."""
    cfg = ShardConfig(sequence_parallel_process_group=group if group is not None
                      else dist.group.WORLD)
    for block in model.double_blocks:
        block.set_processor(DistributedDoubleStreamBlockProcessor(cfg))
    for block in model.single_blocks:
        block.set_processor(DistributedSingleStreamBlockProcessor(cfg))
    model.forward = functools.partial(mmdit_model_forward, model, shard_config=cfg)
    return model


def build_double(seed: int = 0, **overrides) -> MMDiTModel:
    """A small double (fp32, eval) from ``small_config(**overrides)`` with every parameter
    random and non-zero (N(0, 0.15^2); the QK RMSNorm scales around 1)."""
    torch.manual_seed(seed)
    model = MMDiTModel(small_config(**overrides))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
            if name.endswith(".scale"):  # QK RMSNorm scales around 1
                p.add_(1.0)
    return model.eval()


def small_config(**overrides) -> MMDiTConfig:
    cfg = dict(from_pretrained=None, cache_dir=None, in_channels=8, vec_in_dim=12,
               context_in_dim=10, hidden_size=32, mlp_ratio=2.0, num_heads=4, depth=2,
               depth_single_blocks=2, axes_dim=[2, 2, 4], theta=10_000, qkv_bias=True,
               guidance_embed=False, cond_embed=True, fused_qkv=False, use_liger_rope=True)
    cfg.update(overrides)
    return MMDiTConfig(**cfg)


def make_inputs(cfg: MMDiTConfig, grid=(2, 3, 4), txt_len: int = 5, batch: int = 2,
                seed: int = 0, dtype=torch.float32) -> dict:
    """Keyword inputs of the model forward for a T x H x W latent grid (ids as upstream's
    sampling code makes them: (t, h, w) positions for the image, zeros for the text)."""
    t, h, w = grid
    g = torch.Generator().manual_seed(1000 + seed)
    n = t * h * w
    ids = torch.zeros(t, h, w, 3)
    ids[..., 0] += torch.arange(t)[:, None, None]
    ids[..., 1] += torch.arange(h)[None, :, None]
    ids[..., 2] += torch.arange(w)[None, None, :]
    out = dict(
        img=torch.randn(batch, n, cfg.in_channels, generator=g),
        img_ids=ids.reshape(1, n, 3).repeat(batch, 1, 1),
        txt=torch.randn(batch, txt_len, cfg.context_in_dim, generator=g),
        txt_ids=torch.zeros(batch, txt_len, 3),
        timesteps=torch.rand(batch, generator=g),
        y_vec=torch.randn(batch, cfg.vec_in_dim, generator=g),
    )
    if cfg.cond_embed:
        out["cond"] = torch.randn(batch, n, cfg.in_channels + cfg.patch_size ** 2, generator=g)
    if cfg.guidance_embed:
        out["guidance"] = torch.rand(batch, generator=g) * 8
    return {k: v.to(dtype) for k, v in out.items()}
