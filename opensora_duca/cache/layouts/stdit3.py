"""The STDiT3 layout adapter (Open-Sora 1.2 / 1.3): everything the cache knows about the
STDiT3 block layout, read from this project's model and from upstream Open-Sora's objects alike
(:class:`STDiT3Layout`: blocks and their kinds, tapped modules, shapes, the token-sparse reused
step, TeaCache's measured input). Besides, two mappings live here:

* **Token scores from a self-attention** (:func:`attention_token_scores`). The scorers read a
  per-row quantity of a block's self-attention: the value-vector norms of the ``qkv``
  projection output (``vnorm``) or the attention each key receives (``attention``). Where that
  row sits in the block's token order [B, T, S] depends on how the attention module laid its
  input out: spatial ``[(B T), S]``, temporal ``[(B S), T]`` (Open-Sora 1.2, and this project's
  1.3 window attention, which windows after the projection), or upstream 1.3's temporal window
  attention, which is called with the grid ``[B, H, W, T, C]`` and applies ``qkv`` to the padded
  windows, cut into the batch: ``[n_H * n_W * n_T * B, k_H, k_W, k_T, C]`` (window-major,
  sample-minor, each window ordered (h, w, t); padding on the right of each axis, plus the
  shift-window's extra padding where ``extra_pad_on_dims`` is set). The rows are mapped back to
  the token grid and padded positions dropped.
* **The rows of one batch sample in a block's arguments** (:func:`block_args_rows`), so a block
  can run on a sub-batch: tensors with one row per sample are indexed, captions packed as
  upstream packs them (``y [1, sum(y_lens), C]`` with ``mask = y_lens``) are cut per sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ... import parallel as sp
from ...models.layers import gated_add, modulate
from ...models.stdit3 import block_modulation
from ..flops import TrunkShape, full_step_flops, step_flops
from ..plan import Action, Kind
from ..selection import gather_tokens, vnorm_rows
from .base import register_layout


@dataclass(frozen=True)
class WindowGeometry:
    """How a grid ``dims`` (D1, D2, D3) is cut into windows of ``kernel``: ``left`` / ``right``
    padding per axis and ``counts`` windows per axis."""

    dims: Tuple[int, int, int]
    kernel: Tuple[int, int, int]
    left: Tuple[int, int, int]
    right: Tuple[int, int, int]

    @property
    def padded(self) -> Tuple[int, int, int]:
        return tuple(d + a + b for d, a, b in zip(self.dims, self.left, self.right))

    @property
    def counts(self) -> Tuple[int, int, int]:
        return tuple(p // k for p, k in zip(self.padded, self.kernel))

    @property
    def rows_per_sample(self) -> int:
        """Window rows (qkv batch entries x window tokens) per sample."""
        return math.prod(self.padded)


def window_geometry(kernel_size: Sequence[int], dims: Sequence[int],
                    extra_pad: Optional[Sequence[int]] = None) -> WindowGeometry:
    """Upstream 1.3's windowing of a grid ``dims``: -1 in ``kernel_size`` is the whole axis;
    each axis is right-padded to a multiple of its window, and ``extra_pad`` (upstream's
    ``extra_pad_on_dims``: per axis (left, right) extra, the shift-window option) is added."""
    kernel = tuple(int(d) if k == -1 else int(k) for k, d in zip(kernel_size, dims))
    extra = tuple(extra_pad) if extra_pad is not None else (0,) * 6
    left, right = [], []
    for i, (d, k) in enumerate(zip(dims, kernel)):
        left.append(int(extra[2 * i]))
        right.append((k - d % k) % k + int(extra[2 * i + 1]))
    return WindowGeometry(tuple(int(d) for d in dims), kernel, tuple(left), tuple(right))


def windows_to_grid(rows: torch.Tensor, batch: int, geo: WindowGeometry) -> torch.Tensor:
    """Per-row values of the windows ``[n1*n2*n3*B, k1, k2, k3]`` (or ``[.., k1*k2*k3]``) ->
    ``[B, D1, D2, D3]``, padding dropped."""
    n1, n2, n3 = geo.counts
    k1, k2, k3 = geo.kernel
    g = rows.reshape(n1, n2, n3, batch, k1, k2, k3).permute(3, 0, 4, 1, 5, 2, 6)
    g = g.reshape(batch, *geo.padded)
    for axis, (a, d) in enumerate(zip(geo.left, geo.dims)):
        g = g.narrow(axis + 1, a, d)
    return g


def real_window_rows(batch: int, geo: WindowGeometry, device=None) -> torch.Tensor:
    """bool ``[n1*n2*n3*B, k1*k2*k3]``: False where a window row is padding."""
    n1, n2, n3 = geo.counts
    k1, k2, k3 = geo.kernel
    real = torch.zeros(geo.padded, dtype=torch.bool, device=device)
    real[tuple(slice(a, a + d) for a, d in zip(geo.left, geo.dims))] = True
    real = real.view(n1, k1, n2, k2, n3, k3).permute(0, 2, 4, 1, 3, 5)
    return real.reshape(n1 * n2 * n3, 1, k1 * k2 * k3).expand(-1, batch, -1).reshape(
        -1, k1 * k2 * k3)


def _window_input(attn: torch.nn.Module, attn_in: torch.Tensor) -> Optional[WindowGeometry]:
    """The geometry of an upstream-style window attention called with ``[B, H, W, T, C]``."""
    kernel = getattr(attn, "kernel_size", None)
    if attn_in.dim() != 5 or kernel is None:
        return None
    return window_geometry(kernel, attn_in.shape[1:4], getattr(attn, "extra_pad_on_dims", None))


def attention_token_scores(per_row: torch.Tensor, attn_in: torch.Tensor, attn: torch.nn.Module,
                           batch: int, temporal: bool, name: str = "block",
                           others: str = "'random', 'norm' or 'similarity'") -> torch.Tensor:
    """A per-row score of a self-attention (one value per row its ``qkv`` projection or its
    attention map saw) -> ``[B, T*S]`` in the block's token order.

    ``attn_in`` is what the attention module was called with: ``[(B T), S, C]`` (spatial),
    ``[(B S), T, C]`` (temporal) or ``[B, H, W, T, C]`` (upstream 1.3's window attention, whose
    rows are either the grid's tokens in that order, under upstream's sequence parallelism, or
    its padded windows)."""
    tokens = attn_in.numel() // attn_in.shape[-1]
    if attn_in.dim() == 5:
        b, h, w, t = attn_in.shape[:4]
        if tuple(per_row.shape) == tuple(attn_in.shape[:4]):  # rows are the grid's tokens
            grid = per_row
        else:
            geo = _window_input(attn, attn_in)
            if geo is None or per_row.numel() != batch * geo.rows_per_sample:
                raise RuntimeError(
                    f"{name}: the self-attention was called with a grid "
                    f"{tuple(attn_in.shape)} and its qkv / attention map has {per_row.numel()} "
                    f"rows, which is neither one per token nor its windows (kernel_size="
                    f"{getattr(attn, 'kernel_size', None)!r}); choose scorer {others}")
            grid = windows_to_grid(per_row, b, geo)
        return grid.permute(0, 3, 1, 2).reshape(b, -1)  # [B, H, W, T] -> [B, T*H*W]
    if per_row.numel() != tokens or attn_in.dim() != 3:
        raise RuntimeError(
            f"{name}: the self-attention's qkv / attention map has {per_row.numel()} rows for "
            f"an input {tuple(attn_in.shape)} ({tokens} tokens); the scores need one row per "
            f"token; choose scorer {others}")
    r = per_row.reshape(attn_in.shape[:2])
    if temporal:  # [(B S), T] -> [B, T, S]
        return r.view(batch, -1, r.shape[1]).transpose(1, 2).reshape(batch, -1)
    return r.reshape(batch, -1)  # [(B T), S] -> [B, T*S]


def received_per_row(amap: torch.Tensor, attn_in: torch.Tensor, attn: torch.nn.Module,
                     batch: int) -> torch.Tensor:
    """Attention each key receives, summed over heads and (real) queries: an attention map
    ``[B', h, n, n]`` -> ``[B', n]``. Queries at padded window positions are left out (their
    rows exist only because the grid was padded)."""
    amap = amap.float()
    geo = _window_input(attn, attn_in)
    if geo is not None and any(geo.left + geo.right):
        real = real_window_rows(batch, geo, amap.device)
        if real.shape == (amap.shape[0], amap.shape[2]):
            amap = amap * real[:, None, :, None]
    return amap.sum(dim=(1, 2))


def _per_sample(value, batch: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch


def block_args_rows(args: dict, rows: torch.Tensor, batch: int) -> dict:
    """A block's arguments by name (``x, y, t, mask, x_mask, t0, ..., y_null``) for the samples
    ``rows`` (a 1-D long tensor on any device) of a batch of ``batch``.

    Tensors with one row per sample are indexed; ``mask`` given as upstream's per-sample caption
    lengths (a list) is cut, and the captions it describes (``y``, ``y_null`` packed
    ``[1, sum(lengths), C]``) are cut to those samples' segments; everything else (``T``, ``S``,
    ``H``, ``W``, ``scale``, ``mask_index``) is shared by all samples."""
    keep = rows.tolist()
    out = dict(args)
    lens = args.get("mask")
    packed = isinstance(lens, (list, tuple)) and len(lens) == batch
    if packed:
        starts = [sum(lens[:i]) for i in range(batch)]
        out["mask"] = type(lens)(lens[i] for i in keep)
    for key, value in args.items():
        if key == "mask" and packed:
            continue
        if packed and key in ("y", "y_null") and torch.is_tensor(value) and \
                value.shape[0] == 1 and value.shape[1] == sum(lens):
            out[key] = torch.cat([value[:, starts[i]:starts[i] + lens[i]] for i in keep], 1)
        elif _per_sample(value, batch):
            out[key] = value.index_select(0, rows.to(value.device))
        elif torch.is_tensor(value) and value.dim() > 0 and key not in ("scale",) and \
                value.shape[0] not in (1,):
            raise RuntimeError(f"block argument {key!r} has {value.shape[0]} rows for a batch "
                               f"of {batch}; the cache cannot run this block on a sub-batch")
    return out


# ----------------------------------------------------------------------- the adapter
_BLOCK_PARTS = ("norm1", "attn", "cross_attn", "norm2", "mlp", "scale_shift_table")
# block classes (ours and upstream Open-Sora's, by name) whose forward is the math that
# :func:`sparse_step` reproduces; other blocks run reused steps through their own forward
TOKEN_SPARSE_BLOCKS = ("STDiT3Block",)


def _temporal_blocks(model: nn.Module) -> list:
    """The temporal blocks; none for Open-Sora 1.3's ``skip_temporal`` (an empty list, or no
    attribute at all on upstream's model)."""
    blocks = getattr(model, "temporal_blocks", None)
    return [] if blocks is None else list(blocks)


def _gather_mod(m: torch.Tensor, idx: torch.Tensor, s_local: int) -> torch.Tensor:
    """Modulation [B, T|1, 1, C] at the frames of tokens idx [B, k] -> [B, k|1, C]."""
    if m.shape[1] == 1:
        return m[:, 0]
    return gather_tokens(m[:, :, 0], idx // s_local)


def conservative_residual(x, g1, A, CA):
    """Reused step, every token: x + g1 * A + CA, with the block's own association
    (``gated_add`` then the cross-attention residual), from the stored self-attention A and
    cross-attention CA ([B, T, S, C] views) -> [B, T, S, C] (token-major)."""
    return gated_add(x.view(A.shape), g1, A) + CA


def conservative_mlp_tokens(block, x2, sh2, sc2, idx, S: int):
    """Reused step, MLP on a token subset: the selected tokens idx [B, k] of the residual x2
    [B, T, S, C] take norm2, modulation (sh2, sc2 of ``block_modulation``) and the MLP ->
    [B, k, C]. LayerNorm and modulation are per token, so only the selected are computed."""
    xs = gather_tokens(x2.view(x2.shape[0], -1, x2.shape[-1]), idx)
    hs = modulate(block.norm2(xs), _gather_mod(sh2, idx, S), _gather_mod(sc2, idx, S))
    return type(block.mlp).forward(block.mlp, hs)


def conservative_output(x2, g2, M):
    """Reused step, every token: x2 + g2 * M (M [B, T, S, C] stored, with the recomputed
    tokens written in) -> [B, N, C]."""
    b, T, S, c = x2.shape
    return gated_add(x2, g2, M).view(b, T * S, c)


def modulated_input(block, x, y=None, t=None, mask=None, x_mask=None, t0=None, T=None, S=None,
                    **_unused) -> torch.Tensor:
    """The block's normalised input modulated by the timestep (TeaCache's measured signal),
    [B, T*S, C], with the Open-Sora 1.2 modulation layout."""
    b, n, c = x.shape
    sh1, sc1 = block_modulation(block.scale_shift_table, t, x_mask, t0)[:2]
    return modulate(block.norm1(x.view(b, T, S, c)), sh1, sc1).view(b, n, c)


@register_layout
class STDiT3Layout:
    """Open-Sora 1.2 / 1.3 STDiT3 (this project's model and upstream's objects): spatial and
    temporal blocks in pairs (or spatial only, 1.3's ``skip_temporal``), each with ``attn``,
    ``cross_attn`` and ``mlp`` and a 6-row ``scale_shift_table``."""

    name = "stdit3"
    requirement = ("'spatial_blocks' (an nn.ModuleList of STDiT3 blocks) and optionally "
                   "'temporal_blocks' of the same length")
    # tapped submodule -> (stored feature, its kind; None: the block's self-attention kind)
    TAPPED = {"attn": ("attn", None), "cross_attn": ("cross", Kind.CROSS_ATTN),
              "mlp": ("mlp", Kind.MLP)}
    FULL_CALL_KINDS = (Kind.MLP, Kind.CROSS_ATTN)  # kinds a token subset can recompute

    @staticmethod
    def matches(model: nn.Module) -> bool:
        return isinstance(getattr(model, "spatial_blocks", None), nn.ModuleList)

    def __init__(self, model: nn.Module):
        temporal = getattr(model, "temporal_blocks", None)
        if temporal is not None and not isinstance(temporal, nn.ModuleList):
            raise TypeError(f"{type(model).__name__}.temporal_blocks must be an nn.ModuleList")
        temporal = _temporal_blocks(model)
        if temporal and len(model.spatial_blocks) != len(temporal):
            raise TypeError("spatial_blocks and temporal_blocks must have the same length (or "
                            "no temporal blocks, as Open-Sora 1.3's skip_temporal)")
        if not len(model.spatial_blocks):
            raise TypeError(f"apply_cache: {type(model).__name__}.spatial_blocks is empty; "
                            f"accepted: a model with at least one block")
        for blocks in (model.spatial_blocks, temporal):
            for i, blk in enumerate(blocks):
                missing = [p for p in _BLOCK_PARTS if not hasattr(blk, p)]
                if missing:
                    raise TypeError(f"block {i} ({type(blk).__name__}) lacks {missing}; "
                                    f"apply_cache needs blocks with {list(_BLOCK_PARTS)}")
        self.depth = len(model.spatial_blocks)
        self.paired = bool(temporal)

    # ------------------------------------------------------------- blocks
    def blocks(self, model: nn.Module) -> List[Tuple[str, nn.Module, int]]:
        """(name, block, layer) in call order: spatial 0, temporal 0, spatial 1, ..."""
        temporal = _temporal_blocks(model)
        order = []
        for i in range(self.depth):
            order.append((f"spatial_blocks.{i}", model.spatial_blocks[i], i))
            if temporal:
                order.append((f"temporal_blocks.{i}", temporal[i], i))
        return order

    @staticmethod
    def attn_kind(block: nn.Module) -> Kind:
        return Kind.TEMPORAL_ATTN if getattr(block, "temporal", False) else Kind.SPATIAL_ATTN

    @staticmethod
    def qkv_module(block: nn.Module) -> nn.Module:
        """The self-attention's qkv projection (v-norm scores read its output)."""
        return block.attn.qkv

    @staticmethod
    def map_module(block: nn.Module) -> Optional[nn.Module]:
        """Where the self-attention's map can be recorded: None for this project's attention
        (it hands the map back itself), upstream's ``attn_drop`` otherwise."""
        attn = block.attn
        return None if hasattr(attn, "keep_attn_map") else getattr(attn, "attn_drop", None)

    @staticmethod
    def map_support(block: nn.Module) -> Optional[Tuple[str, str]]:
        """None when the self-attention can give attention maps; else (what, fix)."""
        attn = block.attn
        if hasattr(attn, "keep_attn_map"):
            backend = getattr(attn, "backend", None)
            if backend == "math":
                return None
            return (f"uses the {backend!r} attention backend",
                    "build the model with attn_backend='math'")
        if isinstance(getattr(attn, "attn_drop", None), nn.Module):
            if not getattr(attn, "enable_flash_attn", False):
                return None
            return ("runs fused attention (enable_flash_attn=True)",
                    "build the model with enable_flash_attn=False")
        return (f"({type(attn).__name__}) hands back no attention map",
                "use an Open-Sora or opensora_duca attention module")

    def check_maps(self, block: nn.Module) -> None:
        """Refuse scorer 'attention' where the self-attention gives no attention maps."""
        problem = self.map_support(block)
        if problem is not None:
            what, fix = problem
            raise ValueError(
                f"cache scorer 'attention' needs attention maps, and this model's "
                f"self-attention {what}; {fix}, or choose scorer 'vnorm' / 'random', which "
                f"work with fused attention")

    @staticmethod
    def token_sparse(block: nn.Module) -> bool:
        """Whether the block's class is the math :func:`sparse_step` reproduces."""
        return type(block).__name__ in TOKEN_SPARSE_BLOCKS

    # ------------------------------------------------------------- one call
    def trunk_shape(self, model: nn.Module, x: torch.Tensor, y,
                    blk: nn.Module, arg=None) -> Tuple[TrunkShape, tuple]:
        """The trunk's shape of a model call and the latent grid (T, H, W); ``blk``: the
        first patched block (the model's lists may be wrapped meanwhile)."""
        pt, ph, pw = getattr(model, "patch_size", (1, 2, 2))
        _, _, tx, hx, wx = x.shape
        T, H, W = -(-tx // pt), -(-hx // ph), -(-wx // pw)
        temporal = _temporal_blocks(model)
        kernel = getattr(temporal[0].attn, "kernel_size", None) if temporal else None
        shape = TrunkShape(batch=x.shape[0], frames=T, spatial=H * W,
                           hidden=blk.scale_shift_table.shape[-1], depth=self.depth,
                           caption_len=int(y.shape[-2]) if y is not None else 0,
                           mlp_hidden=blk.mlp.fc1.out_features, temporal=bool(temporal),
                           temporal_kernel=None if kernel is None else tuple(kernel),
                           rows=H, width=W)
        return shape, (T, H, W)

    # analytic FLOPs of an uncached step and of a step under a plan (cache/flops.py)
    full_step_flops = staticmethod(full_step_flops)
    step_flops = staticmethod(step_flops)

    @staticmethod
    def sequence_parallel_group(model: nn.Module):
        """The process group the model shards its tokens over (None: not sharded)."""
        if not getattr(model, "enable_sequence_parallelism", False):
            return None
        getter = getattr(model, "sequence_parallel_group", None)
        return getter() if callable(getter) else sp.get_sequence_parallel_group()

    @staticmethod
    def args_rows(bound: dict, rows: torch.Tensor, batch: int) -> dict:
        return block_args_rows(bound, rows, batch)

    # ------------------------------------------------------------- token scores
    def vnorm_scores(self, block, qkv_out, attn_in, batch: int, name: str) -> torch.Tensor:
        """v-norm token scores [B, N] from the recorded output of the block's qkv projection
        (the self-attention was called with ``attn_in``)."""
        return attention_token_scores(vnorm_rows(qkv_out, block.attn.num_heads), attn_in,
                                      block.attn, batch, self.attn_kind(block) ==
                                      Kind.TEMPORAL_ATTN, name)

    def map_scores(self, block, amap, attn_in, batch: int, name: str) -> torch.Tensor:
        """Attention received per token [B, N] from the self-attention's map."""
        rows = received_per_row(amap, attn_in, block.attn, batch)
        return attention_token_scores(rows, attn_in, block.attn, batch,
                                      self.attn_kind(block) == Kind.TEMPORAL_ATTN, name,
                                      others="'vnorm', 'random', 'norm' or 'similarity'")

    @staticmethod
    def attention_with_map(block, map_tap, run):
        """(output, attention map or None) of ``run()``, the block's self-attention: this
        project's attention hands the map back (``keep_attn_map``); upstream's passes it through
        ``attn_drop``, where ``map_tap`` records it."""
        attn = block.attn
        if map_tap is None:
            attn.keep_attn_map = True
            try:
                out = run()
            finally:
                attn.keep_attn_map = False
            amap, attn.last_attn_map = attn.last_attn_map, None
            return out, amap
        map_tap.mode = "record"
        try:
            out = run()
            return out, map_tap.value
        finally:
            map_tap.clear()

    modulated_input = staticmethod(modulated_input)

    # ------------------------------------------------------------- reused step
    @staticmethod
    def sparse_applies(bound: dict) -> bool:
        """Not with Open-Sora 1.3's cross-attention per frame group (``mask_index``)."""
        return not bound.get("mask_index")

    @staticmethod
    def sparse_step(runner, regions, plan, x, y, t, mask=None, x_mask=None, t0=None, T=None,
                    S=None, **_unused):
        """Self- and cross-attention reused, MLP reused or recomputed on selected tokens.
        ``runner`` supplies the stored features (``stored``), the selection (``select``), the
        write-back (``overwrite``) and the counts (``count``); ``regions`` the (compiled)
        functions of this module."""
        block = runner.block
        b, n, c = x.shape
        temporal = runner.kind == Kind.TEMPORAL_ATTN
        # as many elements as [(B S), T, C] / [(B T), S, C], in that memory order (upstream
        # 1.3's temporal window attention returns [B, H, W, T, C])
        a = runner.stored("attn", runner.kind, (b * S, T, c) if temporal else (b * T, S, c),
                          x.dtype, same_size=True)
        A = a.view(b, S, T, c).transpose(1, 2) if temporal else a.view(b, T, S, c)
        CA = runner.stored("cross", Kind.CROSS_ATTN, x.shape, x.dtype).view(b, T, S, c)
        M = runner.stored("mlp", Kind.MLP, x.shape, x.dtype, same_size=True)
        runner.count(runner.kind, Action.REUSE)
        runner.count(Kind.CROSS_ATTN, Action.REUSE)
        runner.count(Kind.MLP, plan.actions[Kind.MLP])
        # the block's six modulation vectors, computed once for the three regions
        _, _, g1, sh2, sc2, g2 = block_modulation(block.scale_shift_table, t, x_mask, t0)
        x2 = regions.residual(x, g1, A, CA)
        if plan.actions[Kind.MLP] == Action.PARTIAL:
            idx = runner.select(Kind.MLP, x)
            new = regions.mlp_tokens(block, x2, sh2, sc2, idx, S)
            M = runner.overwrite("mlp", M, idx, new, x.dtype)
        return regions.output(x2, g2, M.view(b, T, S, c))

    # the functions of the reused step that run compiled with ``compile=``
    REGIONS = {"residual": conservative_residual, "mlp_tokens": conservative_mlp_tokens,
               "output": conservative_output}
