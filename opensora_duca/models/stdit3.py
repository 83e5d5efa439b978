"""STDiT3: Open-Sora 1.2's spatial-temporal video DiT, checkpoint compatible.

Equations, parameter names and the sequence-parallel scheme are in docs/stdit3.md. Differences
from upstream that do not change results: captions are padded per sample with a key mask
instead of packed into one block-diagonal sequence; cross-attention runs on local tokens under
sequence parallelism (no all-to-all), which also makes B >= 2 classifier-free-guidance batches
correct; H is padded to a multiple of the group size and padded rows are kept out of the keys.
"""
from __future__ import annotations

import inspect
import math
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .. import parallel as sp
from ..registry import MODELS
from .attention import check_backend
from .checkpoint import load_checkpoint
from .layers import (
    Attention,
    CaptionEmbedder,
    DropPath,
    FramePositionEmbedding,
    Mlp,
    MultiHeadCrossAttention,
    PatchEmbed3D,
    PositionEmbedding2D,
    RotaryEmbedding,
    SeqParallelState,
    SizeEmbedder,
    T2IFinalLayer,
    TimestepEmbedder,
    gated_add,
    modulate,
    select_by_frame,
)
from .window import check_kernel_size

# Keyword arguments Open-Sora 1.2's pipeline passes to the model besides the ones forward uses
# (y, mask, x_mask, fps, height, width): its inference script adds the multi-resolution info
# ``num_frames`` and ``ar`` (aspect ratio) and its training loop forwards the same batch fields.
# Upstream STDiT3.forward takes them through **kwargs and never reads them; so does this one.
# Any other keyword is an error.
UPSTREAM_IGNORED_ARGS = ("num_frames", "ar")


def _forward_arguments() -> tuple:
    """The named arguments of :meth:`STDiT3.forward` (its signature, so the error message that
    lists them cannot fall behind it)."""
    params = inspect.signature(STDiT3.forward).parameters
    return tuple(k for k, p in params.items()
                 if k != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD)


# Boolean options of STDiT3.__init__ (validated as such).
_BOOL_OPTIONS = ("pred_sigma", "qk_norm", "enable_flash_attn", "enable_layernorm_kernel",
                 "enable_sequence_parallelism", "only_train_temporal", "freeze_y_embedder",
                 "skip_y_embedder", "temporal_pos_embed", "use_spatial_rope", "skip_temporal",
                 "cond_embedders")


def block_modulation(table: torch.Tensor, t: torch.Tensor, x_mask=None, t0=None):
    """The six modulation vectors of a block, each broadcastable over x viewed [B, T, S, C]:
    [B, 1, 1, C], or [B, T, 1, C] when ``x_mask`` selects the t0 version on some frames."""
    b = t.shape[0]
    mods = (table[None] + t.reshape(b, 6, -1)).chunk(6, dim=1)  # 6 x [B, 1, C]
    if x_mask is None:
        return [m[:, None] for m in mods]
    mods0 = (table[None] + t0.reshape(b, 6, -1)).chunk(6, dim=1)
    return [select_by_frame(x_mask, m, m0) for m, m0 in zip(mods, mods0)]


def run_self_attn(block, h: torch.Tensor, H=None, W=None, scale=None) -> torch.Tensor:
    """Apply ``block.attn`` to modulated tokens h [B, T, S, C] over S (spatial) or T (temporal);
    an attention module with Open-Sora 1.3 options also gets the latent grid (H rows held here,
    W columns, the resolution scale)."""
    b, t, s, c = h.shape
    grid = dict(H=H, W=W, scale=scale) if getattr(block.attn, "needs_grid", False) else {}
    if block.temporal:
        out = block.attn(h.transpose(1, 2).reshape(b * s, t, c), **grid)
        return out.view(b, s, t, c).transpose(1, 2)
    return block.attn(h.reshape(b * t, s, c), **grid).view(b, t, s, c)


def split_cross_attn(block, xv: torch.Tensor, y, y_null, mask, mask_index) -> torch.Tensor:
    """Open-Sora 1.3's i2v/v2v cross-attention of x [B, T, S, C]: the frames in ``mask_index``
    (the given ones) attend to the null caption ``y_null``, the others to ``y``."""
    b, T, S, c = xv.shape
    given = list(mask_index)
    rest = [i for i in range(T) if i not in given]
    out = torch.empty_like(xv)
    for frames, cond in ((given, y_null), (rest, y)):
        if frames:
            part = xv[:, frames].reshape(b, len(frames) * S, c)
            out[:, frames] = block.cross_attn(part, cond, mask).view(b, len(frames), S, c)
    return out


class STDiT3Block(nn.Module):
    """One spatial or temporal block. Open-Sora 1.3 options: ``rope3d`` (3-D rotary embedding
    in the self-attention) and, in temporal blocks, ``kernel_size`` (window attention, which
    then also takes part in sequence parallelism)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, rope=None, qk_norm: bool = True, temporal: bool = False,
                 backend: str = "sdpa", sp_state: Optional[SeqParallelState] = None,
                 rope3d=None, kernel_size=None):
        super().__init__()
        self.temporal = temporal
        self.hidden_size = hidden_size
        window = temporal and kernel_size is not None
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm,
                              rope=rope if temporal and not window else None, backend=backend,
                              sp_state=sp_state if window or not temporal else None,
                              rope3d=rope3d, kernel_size=kernel_size if window else None)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads, backend=backend)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size ** 0.5)

    def forward(self, x, y, t, mask=None, x_mask=None, t0=None, T=None, S=None, H=None, W=None,
                scale=None, mask_index=None, y_null=None):
        b, n, c = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = block_modulation(self.scale_shift_table, t, x_mask, t0)
        xv = x.view(b, T, S, c)
        h = run_self_attn(self, modulate(self.norm1(xv), sh1, sc1), H, W, scale)
        xv = gated_add(xv, g1, h, self.drop_path)
        if mask_index is not None and len(mask_index) > 0:
            xv = xv + split_cross_attn(self, xv, y, y_null, mask, mask_index)
        else:
            xv = xv + self.cross_attn(xv.reshape(b, n, c), y, mask).view(b, T, S, c)
        h = self.mlp(modulate(self.norm2(xv), sh2, sc2))
        xv = gated_add(xv, g2, h, self.drop_path)
        return xv.reshape(b, n, c)


class STDiT3(nn.Module):
    """Open-Sora 1.2 STDiT3. ``forward(x, timestep, y, mask=None, x_mask=None, fps=None,
    height=None, width=None)`` -> float32 ``[B, out_channels, T, H, W]``.

    ``attn_backend`` (auto | flash | xformers | sdpa | math) wins over ``enable_flash_attn``;
    without it, ``enable_flash_attn=True`` means "auto" (flash-attn where installed) and False
    means "sdpa". With ``fps``/``height``/``width`` omitted, fps=24 and the position-embedding
    scale is 1 (height*width taken as input_sq_size^2).

    ``temporal_pos_embed=True`` (not upstream; the demo preset uses it) adds a fixed sin-cos
    embedding of the frame index to every token at the input, so the model knows each frame's
    absolute position in the clip; it adds no weights.

    Upstream options, as Open-Sora 1.2 uses them:

    - ``drop_path``: stochastic depth at training, rate growing linearly from 0 (first block)
      to ``drop_path`` (last block), in spatial and temporal blocks alike; identity in eval.
    - ``skip_y_embedder``: ``y`` is already embedded, ``[B, 1, L, hidden_size]``, and is used as
      given (no y_proj, no caption dropout); ``mask`` is then the key mask ``[B', L]`` or, as
      upstream passes it, the per-sample valid lengths (an int, B ints, or a 1-D tensor).
    - ``only_train_temporal``: every parameter but the temporal blocks' is frozen
      (``requires_grad=False``); ``freeze_y_embedder``: the caption projection is frozen.
    - ``enable_layernorm_kernel``: upstream selects apex's fused LayerNorm with it, which
      computes the same LayerNorm; torch's LayerNorm is used either way.
    - ``input_size``: passed by Open-Sora's scripts; unused, as upstream (sizes come from x).
    - ``forward`` also accepts the :data:`UPSTREAM_IGNORED_ARGS` and ignores them as upstream.

    Open-Sora 1.3 options (upstream's names; docs/stdit3.md, "Open-Sora 1.3"):

    - ``kernel_size``: 3-D window attention (rows, columns, frames; -1 = whole axis) in the
      temporal blocks, with a 3-D rotary embedding inside each window; the rotation dimension
      becomes head_dim / 3 (``rope.freqs`` shrinks accordingly).
    - ``use_spatial_rope``: the 3-D rotary embedding in the spatial blocks too (needs
      ``kernel_size``).
    - ``skip_temporal``: no temporal blocks at all.
    - ``cond_embedders`` (not an upstream option: every 1.3 model has them):
      ``x_embedder_cond`` / ``x_embedder_cond_mask``, the patch embeddings of the reference
      latents ``cond`` and their mask ``cond_mask`` that i2v / v2v add to the input. Then
      ``forward`` takes ``cond``, ``cond_mask``, ``mask_index`` (latent frames given as
      reference, whose cross-attention reads ``y_null``) and ``y_null``; 1.3 checkpoints also
      need ``in_channels=16``.
    - ``forward(text_uncond_prob=p)``: caption-dropout rate for this call (training).
    """

    def __init__(self, input_size=(None, None, None), input_sq_size: int = 512,
                 in_channels: int = 4, patch_size: Sequence[int] = (1, 2, 2),
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1, pred_sigma: bool = True,
                 drop_path: float = 0.0, caption_channels: int = 4096, model_max_length: int = 300,
                 qk_norm: bool = True, enable_flash_attn: bool = False,
                 enable_layernorm_kernel: bool = False, enable_sequence_parallelism: bool = False,
                 attn_backend: Optional[str] = None, only_train_temporal: bool = False,
                 freeze_y_embedder: bool = False, skip_y_embedder: bool = False,
                 temporal_pos_embed: bool = False, kernel_size: Optional[Sequence[int]] = None,
                 use_spatial_rope: bool = False, skip_temporal: bool = False,
                 cond_embedders: bool = False):
        super().__init__()
        options = dict(pred_sigma=pred_sigma, qk_norm=qk_norm, enable_flash_attn=enable_flash_attn,
                       enable_layernorm_kernel=enable_layernorm_kernel,
                       enable_sequence_parallelism=enable_sequence_parallelism,
                       only_train_temporal=only_train_temporal,
                       freeze_y_embedder=freeze_y_embedder, skip_y_embedder=skip_y_embedder,
                       temporal_pos_embed=temporal_pos_embed, use_spatial_rope=use_spatial_rope,
                       skip_temporal=skip_temporal, cond_embedders=cond_embedders)
        for key in _BOOL_OPTIONS:
            if not isinstance(options[key], bool):
                raise ValueError(f"STDiT3 {key}={options[key]!r}: accepted: True or False")
        if isinstance(drop_path, bool) or not isinstance(drop_path, (int, float)) or \
                not 0 <= drop_path < 1:
            raise ValueError(f"STDiT3 drop_path={drop_path!r}: accepted: a number in [0, 1)")
        for key, val in dict(in_channels=in_channels, hidden_size=hidden_size, depth=depth,
                             num_heads=num_heads, caption_channels=caption_channels,
                             model_max_length=model_max_length).items():
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"STDiT3 {key}={val!r}: must be a positive integer")
        if not (isinstance(patch_size, (list, tuple)) and len(patch_size) == 3 and all(
                isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in patch_size)):
            raise ValueError(f"STDiT3 patch_size={patch_size!r}: accepted: three positive "
                             f"integers (T, H, W), e.g. (1, 2, 2)")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) \
                or not math.isfinite(mlp_ratio) or mlp_ratio <= 0 \
                or int(hidden_size * mlp_ratio) < 1:
            raise ValueError(f"STDiT3 mlp_ratio={mlp_ratio!r}: accepted: a finite number > 0 "
                             f"(the MLP width is int(hidden_size * mlp_ratio) >= 1)")
        if hidden_size % num_heads:
            raise ValueError(f"STDiT3 hidden_size={hidden_size} is not divisible by "
                             f"num_heads={num_heads}")
        kernel_size = check_kernel_size(kernel_size)
        if use_spatial_rope and kernel_size is None:
            raise ValueError("STDiT3 use_spatial_rope=True needs kernel_size (as upstream); "
                             "accepted: kernel_size=(rows, columns, frames), e.g. (8, 8, -1)")
        head_dim = hidden_size // num_heads
        if kernel_size is not None and head_dim % 6:
            raise ValueError(f"STDiT3 kernel_size={kernel_size}: the 3-D rotary embedding "
                             f"needs hidden_size / num_heads divisible by 6, got {head_dim}")
        self.kernel_size, self.use_spatial_rope = kernel_size, use_spatial_rope
        self.skip_temporal = skip_temporal
        self.pred_sigma = pred_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.caption_channels = caption_channels
        self.model_max_length = model_max_length
        self.hidden_size, self.num_heads, self.depth = hidden_size, num_heads, depth
        self.patch_size = tuple(patch_size)
        self.input_sq_size = input_sq_size
        self.enable_sequence_parallelism = enable_sequence_parallelism
        self.enable_layernorm_kernel = enable_layernorm_kernel  # torch's LayerNorm either way
        self.skip_y_embedder = skip_y_embedder
        self.attn_backend = check_backend(attn_backend or ("auto" if enable_flash_attn else "sdpa"))
        self.sp_state = SeqParallelState()

        self.pos_embed = PositionEmbedding2D(hidden_size)
        # optional absolute frame index (not in upstream STDiT3; parameter-free)
        self.temporal_pos_embed = FramePositionEmbedding(hidden_size) if temporal_pos_embed \
            else None
        self.rope = RotaryEmbedding(dim=head_dim if kernel_size is None else head_dim // 3)
        self.x_embedder = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        if cond_embedders:  # Open-Sora 1.3 i2v / v2v conditioning
            self.x_embedder_cond = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
            self.x_embedder_cond_mask = PatchEmbed3D(self.patch_size, in_channels, hidden_size)
        self.cond_embedders = cond_embedders
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.fps_embedder = SizeEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, class_dropout_prob,
                                          model_max_length)
        kw = dict(mlp_ratio=mlp_ratio, qk_norm=qk_norm, backend=self.attn_backend)
        # stochastic-depth rate per layer: 0 for the first, drop_path for the last
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        rope3d = self.rope.rotate_3d if kernel_size is not None else None
        self.spatial_blocks = nn.ModuleList(
            [STDiT3Block(hidden_size, num_heads, drop_path=r, sp_state=self.sp_state,
                         rope3d=rope3d if use_spatial_rope else None, **kw) for r in rates])
        self.temporal_blocks = nn.ModuleList() if skip_temporal else nn.ModuleList(
            [STDiT3Block(hidden_size, num_heads, drop_path=r, temporal=True,
                         rope=self.rope.rotate_queries_or_keys, sp_state=self.sp_state,
                         rope3d=rope3d, kernel_size=kernel_size, **kw) for r in rates])
        self.final_layer = T2IFinalLayer(hidden_size, math.prod(self.patch_size), self.out_channels)
        self.initialize_weights()
        if only_train_temporal:
            self.requires_grad_(False)
            self.temporal_blocks.requires_grad_(True)
        if freeze_y_embedder:
            self.y_embedder.requires_grad_(False)

    # ------------------------------------------------------------------ init
    def initialize_weights(self):
        """Open-Sora's initialisation (matters only when training from scratch)."""
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for emb in (self.t_embedder, self.fps_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        if self.cond_embedders:
            for emb in (self.x_embedder_cond, self.x_embedder_cond_mask):
                nn.init.zeros_(emb.proj.weight)
                nn.init.zeros_(emb.proj.bias)
        for blk in self.temporal_blocks:
            nn.init.zeros_(blk.attn.proj.weight)
            nn.init.zeros_(blk.cross_attn.proj.weight)
            nn.init.zeros_(blk.mlp.fc2.weight)

    # --------------------------------------------------------------- helpers
    def get_dynamic_size(self, x: torch.Tensor):
        _, _, t, h, w = x.shape
        pt, ph, pw = self.patch_size
        return -(-t // pt), -(-h // ph), -(-w // pw)

    def encode_text(self, y: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    uncond_prob: Optional[float] = None):
        """y [B, 1, L, Cy] -> ([B, L, C], bool key mask [B, L] or None); with skip_y_embedder
        y [B, 1, L, C] is already embedded."""
        y = y.squeeze(1) if self.skip_y_embedder else self.y_embedder(
            y, self.training, uncond_prob=uncond_prob).squeeze(1)
        if mask is not None:
            if mask.shape[0] != y.shape[0]:
                mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
            mask = mask.reshape(y.shape[0], -1) != 0
        return y, mask

    def _lengths_to_mask(self, lengths, y: torch.Tensor) -> torch.Tensor:
        """skip_y_embedder: per-sample valid caption lengths (upstream's y_lens) -> [B, L] mask."""
        b, n = y.shape[0], y.shape[2]
        lens = torch.as_tensor(lengths, device=y.device).reshape(-1)
        if lens.is_floating_point() or lens.dtype == torch.bool or lens.shape[0] not in (1, b) \
                or bool(((lens < 1) | (lens > n)).any()):
            raise ValueError(f"mask={lengths!r}: with skip_y_embedder, accepted: a key mask "
                             f"[B or B/k, L={n}] or valid caption lengths (an int or {b} ints, "
                             f"each in 1..{n})")
        return torch.arange(n, device=y.device)[None] < lens.expand(b)[:, None]

    def _check_inputs(self, x, timestep, y, mask, x_mask):
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected latents [B, {self.in_channels}, T, H, W] "
                             f"(in_channels={self.in_channels}), got shape {tuple(x.shape)}")
        b = x.shape[0]
        if timestep.reshape(-1).shape[0] != b:
            raise ValueError(f"timestep: expected {b} values, got shape {tuple(timestep.shape)}")
        cy = self.hidden_size if self.skip_y_embedder else self.caption_channels
        if y.ndim != 4 or y.shape[0] != b or y.shape[1] != 1 or y.shape[3] != cy:
            what = " (already embedded: skip_y_embedder=True)" if self.skip_y_embedder else ""
            raise ValueError(f"y: expected caption embedding [{b}, 1, L, {cy}]{what}, got "
                             f"shape {tuple(y.shape)}")
        if mask is not None:
            m = mask.reshape(mask.shape[0], -1)
            if m.shape[1] != y.shape[2] or b % m.shape[0]:
                raise ValueError(f"mask: expected [B or B/k, L={y.shape[2]}] for y "
                                 f"{tuple(y.shape)}, got shape {tuple(mask.shape)}")
        if x_mask is not None:
            t = self.get_dynamic_size(x)[0]
            if tuple(x_mask.shape) != (b, t):
                raise ValueError(f"x_mask: expected [B={b}, T={t}] bool, got shape "
                                 f"{tuple(x_mask.shape)}")

    def sequence_parallel_group(self):
        if not self.enable_sequence_parallelism:
            return None
        group = sp.get_sequence_parallel_group()
        p = sp.group_size(group)
        if p > 1 and self.num_heads % p:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by the sequence-"
                             f"parallel group size {p}; choose a group size that divides it")
        return group if p > 1 else None

    # --------------------------------------------------------------- forward
    def _check_conditioning(self, x, y, cond, cond_mask, mask_index, y_null):
        """Open-Sora 1.3 i2v / v2v inputs -> mask_index as a list of frame indices (or None)."""
        if mask_index is None:
            return None
        if not self.cond_embedders:
            raise ValueError("mask_index given, but this STDiT3 has no i2v / v2v conditioning "
                             "embedders; accepted: mask_index=None, or build the model with "
                             "cond_embedders=True (Open-Sora 1.3)")
        t = self.get_dynamic_size(x)[0]
        idx = mask_index.tolist() if isinstance(mask_index, torch.Tensor) else mask_index
        if not isinstance(idx, (list, tuple)) or len(set(idx)) != len(idx) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < t for i in idx):
            raise ValueError(f"mask_index={mask_index!r}: accepted: distinct latent frame "
                             f"indices in 0..{t - 1}")
        for key, val in (("cond", cond), ("cond_mask", cond_mask)):
            if not isinstance(val, torch.Tensor) or tuple(val.shape) != tuple(x.shape):
                shape = tuple(val.shape) if isinstance(val, torch.Tensor) else val
                raise ValueError(f"{key}={shape!r}: with mask_index, accepted: a tensor shaped "
                                 f"like x {tuple(x.shape)}")
        if idx and (not isinstance(y_null, torch.Tensor) or y_null.shape != y.shape):
            shape = tuple(y_null.shape) if isinstance(y_null, torch.Tensor) else y_null
            raise ValueError(f"y_null={shape!r}: with a non-empty mask_index, accepted: the null "
                             f"caption embedding shaped like y {tuple(y.shape)}")
        return list(idx)

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None,
                cond=None, cond_mask=None, mask_index=None, y_null=None, text_uncond_prob=None,
                **kwargs):
        unexpected = sorted(k for k in kwargs if k not in UPSTREAM_IGNORED_ARGS)
        if unexpected:
            raise TypeError(f"STDiT3.forward got unexpected arguments {unexpected}; accepted: "
                            f"{list(_forward_arguments())}, and "
                            f"{list(UPSTREAM_IGNORED_ARGS)} (ignored, as upstream does)")
        if self.skip_y_embedder and y.ndim == 4 and mask is not None and not (
                isinstance(mask, torch.Tensor) and mask.ndim >= 2):
            mask = self._lengths_to_mask(mask, y)
        self._check_inputs(x, timestep, y, mask, x_mask)
        mask_index = self._check_conditioning(x, y, cond, cond_mask, mask_index, y_null)
        dtype = self.x_embedder.proj.weight.dtype
        b = x.shape[0]
        x, y = x.to(dtype), y.to(dtype)
        timestep = timestep.reshape(-1).to(dtype)
        _, _, tx, hx, wx = x.shape
        T, H, W = self.get_dynamic_size(x)
        S = H * W
        base_size = round(S ** 0.5)
        if height is not None and width is not None:
            # a 0-d float64 tensor on the device (no host-device sync), the value the host
            # arithmetic (h * w) ** 0.5 / input_sq_size gives
            h0, w0 = (torch.as_tensor(v, device=x.device).reshape(-1)[0].double()
                      for v in (height, width))
            scale = (h0 * w0).sqrt() / self.input_sq_size
        else:
            scale = 1.0
        pos_emb = self.pos_embed(H, W, scale, base_size, x.dtype, x.device)

        fps = torch.full((1,), 24.0, device=x.device) if fps is None else torch.as_tensor(
            fps, device=x.device)
        t = self.t_embedder(timestep, dtype=x.dtype)
        fps_emb = self.fps_embedder(fps.to(x.dtype), b)
        t = t + fps_emb
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(torch.zeros_like(timestep), dtype=x.dtype) + fps_emb
            t0_mlp = self.t_block(t0)
            x_mask = x_mask.to(torch.bool)

        y, y_mask = self.encode_text(y, mask, text_uncond_prob)
        if y_null is not None:
            y_null = self.encode_text(y_null.to(dtype), mask, text_uncond_prob)[0]
        x = self.x_embedder(x)
        if mask_index is not None:
            x = x + self.x_embedder_cond(cond.to(dtype)) + \
                self.x_embedder_cond_mask(cond_mask.to(dtype))
        x = x.view(b, T, S, -1) + pos_emb[:, None]
        if self.temporal_pos_embed is not None:
            x = x + self.temporal_pos_embed(T, x.dtype, x.device)[None, :, None]

        group = self.sequence_parallel_group()
        self.sp_state.group = group
        self.sp_state.valid_len = S
        try:
            x = sp.split_rows(x, group, H, W)
            s_local = x.shape[2]
            x = x.reshape(b, T * s_local, -1)
            # blocks get Open-Sora 1.3's extra arguments only where they matter, so a 1.2 model
            # calls its blocks exactly as Open-Sora 1.2 does
            args = (y, t_mlp, y_mask, x_mask, t0_mlp, T, s_local)
            if self.kernel_size is not None or self.use_spatial_rope:
                args += (s_local // W, W, scale)
            kw = {} if mask_index is None else dict(mask_index=mask_index, y_null=y_null)
            for i, spatial in enumerate(self.spatial_blocks):
                x = spatial(x, *args, **kw)
                if not self.skip_temporal:
                    x = self.temporal_blocks[i](x, *args, **kw)
            x = sp.gather_rows(x.view(b, T, s_local, -1), group, H, W).reshape(b, T * S, -1)
        finally:  # hold no process group between calls: it must be freed before shutdown
            self.sp_state.group = self.sp_state.valid_len = None

        x = self.final_layer(x, t, x_mask, t0, T, S)
        return self.unpatchify(x, T, H, W, tx, hx, wx).float()

    def unpatchify(self, x, T, H, W, tx, hx, wx):
        pt, ph, pw = self.patch_size
        b = x.shape[0]
        x = x.view(b, T, H, W, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.out_channels, T * pt, H * ph, W * pw)
        return x[:, :, :tx, :hx, :wx]


# --------------------------------------------------------------------- presets
def hf_folder_options(folder: str) -> dict:
    """The model options a local Hugging Face folder records, as upstream's
    ``STDiT3.from_pretrained`` takes them: the ``config.json`` entries that are STDiT3 options
    (upstream's ``STDiT3Config`` fields; transformers' own bookkeeping such as ``model_type`` or
    ``torch_dtype`` is not a model option), and ``cond_embedders=True`` when the weights hold
    Open-Sora 1.3's reference-frame embedders (upstream's 1.3 class always builds them).
    Read as JSON and from the weights' key names only: nothing in the folder runs."""
    import inspect
    import json

    from .checkpoint import checkpoint_keys

    path = os.path.join(os.path.expanduser(str(folder)), "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"model from_pretrained={folder!r}: config.json is not readable JSON "
                         f"({err}); accepted: the folder's Hugging Face config.json") from None
    if not isinstance(raw, dict):
        raise ValueError(f"model from_pretrained={folder!r}: config.json holds a "
                         f"{type(raw).__name__}; accepted: a JSON object of STDiT3 options")
    accepted = set(inspect.signature(STDiT3.__init__).parameters) - {"self", "input_size"}
    opts = {}
    for key, value in raw.items():
        if key in accepted:
            opts[key] = tuple(value) if isinstance(value, list) else value
    keys = checkpoint_keys(folder)
    if any(k.startswith("x_embedder_cond.") for k in keys):
        opts.setdefault("cond_embedders", True)
    blocks = {int(k.split(".")[1]) for k in keys
              if k.startswith("spatial_blocks.") and k.split(".")[1].isdigit()}
    depth = opts.get("depth")
    if blocks and depth is not None and depth != max(blocks) + 1:
        # refused before a model of that depth is built
        raise ValueError(f"model from_pretrained={folder!r}: config.json depth={depth!r} but "
                         f"the weights hold {max(blocks) + 1} blocks; accepted: a config.json "
                         f"that matches its weights")
    return opts


def _build(preset: dict, from_pretrained: Optional[str] = None, force_huggingface: bool = False,
           **kwargs) -> STDiT3:
    """``force_huggingface`` (Open-Sora 1.3 configs): upstream then builds the model from the
    Hugging Face folder ``from_pretrained`` through transformers; here a *local* folder is
    read: its config.json options (:func:`hf_folder_options`) replace the preset's, the
    config's own ``model`` keys win over both, and the weights load like any checkpoint.
    Nothing is downloaded."""
    if force_huggingface and from_pretrained is None:
        raise ValueError("model force_huggingface=True needs from_pretrained (a local Hugging "
                         "Face folder); accepted: a path, or force_huggingface=False")
    cfg = dict(preset)
    if force_huggingface and os.path.isdir(os.path.expanduser(str(from_pretrained))):
        cfg.update(hf_folder_options(from_pretrained))
    cfg.update(kwargs)
    model = STDiT3(**cfg)
    if from_pretrained is not None:
        load_checkpoint(model, from_pretrained)
    return model


PRESETS = {
    "STDiT3-XL/2": dict(depth=28, hidden_size=1152, patch_size=(1, 2, 2), num_heads=16),
    "STDiT3-3B/2": dict(depth=28, hidden_size=1872, patch_size=(1, 2, 2), num_heads=26),
    # CPU-sized model of the same class, for benchmarks and tests
    "STDiT3-S/2": dict(depth=4, hidden_size=256, patch_size=(1, 2, 2), num_heads=8,
                       caption_channels=64, model_max_length=16),
    # the shipped demo model (trained by tools/train.py on synthetic shapes)
    "STDiT3-demo": dict(depth=4, hidden_size=64, patch_size=(1, 2, 2), num_heads=4,
                        in_channels=12, caption_channels=64, model_max_length=12,
                        input_sq_size=32, class_dropout_prob=0.0, temporal_pos_embed=True),
}


def _register(name: str, preset: dict):
    def builder(from_pretrained: Optional[str] = None, **kwargs) -> STDiT3:
        return _build(preset, from_pretrained=from_pretrained, **kwargs)
    builder.__name__ = name.replace("/", "_").replace("-", "_")
    builder.__doc__ = f"Build {name} ({preset}); keyword arguments override the preset."
    MODELS.register_module(name=name, module=builder)


for _name, _preset in PRESETS.items():
    _register(_name, _preset)
