"""The MMDiT layout adapter (Open-Sora 2.0, a Flux-style MMDiT): everything the cache knows about
its double-stream and single-stream blocks, read from this project's model and from upstream
Open-Sora 2.0's objects alike (both delegate each block to a processor object; upstream's
ColossalAI booster swaps the processors for distributed ones, which changes nothing here).

The trunk is ``double_blocks`` (each takes and returns ``(img, txt)``) then ``single_blocks`` (each
takes and returns ``x = cat(txt, img)``). Module kinds, as the policies plan them:

* ``spatial_attn`` — the joint attention (one computation for both streams; in a double block
  the stored features are the projected attention outputs of each stream, ``img_attn.proj`` and
  ``txt_attn.proj``; in a single block the attention's share of ``linear2``);
* ``mlp`` — the MLPs (``img_mlp`` and ``txt_mlp``; in a single block the MLP's share of
  ``linear1`` / ``linear2``);
* ``temporal_attn`` and ``cross_attn`` have no module here (an MMDiT has no temporal blocks and
  reads the text through the joint attention), so what a policy says for them does nothing.

Steps: a block whose attention the plan computes runs its own forward (its processor) with the
tapped modules recording; its MLP is then reused only in a double block (a single block's MLP
shares ``linear1`` with the attention, so it is computed as well). A block whose attention the
plan reuses takes the token-sparse step below: the stored attention outputs under this step's
gates, and the MLP reused, recomputed on the chosen *image* tokens (a conservative step: the
text tokens' MLP is reused), or computed. A single block's ``linear2`` is recorded in two
matrix products (attention columns, MLP columns plus bias: the same FLOPs as one) so the two
shares are stored apart.

Tokens: image tokens are ``(t h w)``-ordered, so the token grid (T, H, W) — read once per run
from ``img_ids`` — gives the same per-latent-row quotas as STDiT3; under this project's sequence
parallelism each rank holds whole latent rows of every frame (``models/mmdit.py``) and the text
in even chunks. Timesteps are in [0, 1]; the cache plans in 0..1000 (``TIMESTEP_SCALE``).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...models.mmdit import token_grid as mmdit_token_grid
from ..flops import TrunkShape
from ..plan import Action, Kind
from ..selection import gather_tokens
from .base import register_layout

_DOUBLE_PARTS = ("img_mod", "txt_mod", "img_norm1", "txt_norm1", "img_attn", "txt_attn",
                 "img_norm2", "txt_norm2", "img_mlp", "txt_mlp")
_SINGLE_PARTS = ("modulation", "pre_norm", "linear2", "mlp_act")


def is_double(block: nn.Module) -> bool:
    return hasattr(block, "img_mlp")


def _modulation(mod: nn.Module, vec: torch.Tensor) -> tuple:
    """The block's own ``Modulation`` module on ``vec``: (shift, scale, gate) [B, 1, C] of its
    first output, then of its second (double blocks)."""
    first, second = mod(vec)
    outs = (first,) if second is None else (first, second)
    return tuple(t for m in outs for t in (m.shift, m.scale, m.gate))


def _modulate(x, shift, scale):
    return (1 + scale) * x + shift


def _hidden(block) -> int:
    return int(block.hidden_size)


def _mlp_in(block) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A single block's MLP input projection (the MLP columns of ``linear1`` or ``v_mlp``)."""
    c = _hidden(block)
    if getattr(block, "fused_qkv", True) and hasattr(block, "linear1"):
        lin, start = block.linear1, 3 * c
    else:
        lin, start = block.v_mlp, c
    bias = None if lin.bias is None else lin.bias[start:]
    return lin.weight[start:], bias


def split_linear2(module: nn.Linear, inp: torch.Tensor, *_unused, **_kw):
    """``linear2`` of a single block as two products: the attention columns and the MLP columns
    plus the bias -> (output, {"attn": ..., "mlp": ...}); the same FLOPs as one product."""
    c = module.out_features
    a = F.linear(inp[..., :c], module.weight[:, :c])
    m = F.linear(inp[..., c:], module.weight[:, c:], module.bias)
    return a + m, {"attn": a, "mlp": m}


# ----------------------------------------------------------------------- FLOPs
def _double_flops(shape: TrunkShape, attn: bool, img_mlp_tokens: float, txt_mlp: bool) -> float:
    b, n, L, c, f = shape.batch, shape.tokens, shape.caption_len, shape.hidden, shape.mlp_hidden
    total = 0.0
    if attn:
        total += 2 * (n + L) * c * 3 * c + 4 * (n + L) ** 2 * c + 2 * (n + L) * c * c
    total += 4 * img_mlp_tokens * c * f + (4 * L * c * f if txt_mlp else 0.0)
    return b * total


def _single_flops(shape: TrunkShape, attn: bool, mlp_tokens: float) -> float:
    b, n, L, c, f = shape.batch, shape.tokens, shape.caption_len, shape.hidden, shape.mlp_hidden
    total = 0.0
    if attn:
        total += 2 * (n + L) * c * 3 * c + 4 * (n + L) ** 2 * c + 2 * (n + L) * c * c
    return b * (total + 4 * mlp_tokens * c * f)


def full_step_flops(shape: TrunkShape) -> float:
    """Matrix products of every block for the whole batch (2 FLOPs per multiply-add): per
    double block both streams' qkv, projections and MLPs plus the joint attention; per single
    block linear1, the joint attention and linear2."""
    n, L = shape.tokens, shape.caption_len
    return (shape.depth * _double_flops(shape, True, n, True)
            + shape.single_depth * _single_flops(shape, True, n + L))


def step_flops(shape: TrunkShape, plan, partial_tokens: Optional[dict] = None) -> float:
    """FLOPs of one step under ``plan``, as :class:`MMDiTLayout` runs it (a computed attention
    computes a single block's MLP too, and a double block's image MLP in full)."""
    if plan.skip_trunk:
        return 0.0
    n, L = shape.tokens, shape.caption_len
    if plan.residual_from is not None:
        k = plan.residual_from
        doubles, singles = min(k, shape.depth), max(k - shape.depth, 0)
        before = (doubles * _double_flops(shape, True, n, True)
                  + singles * _single_flops(shape, True, n + L))
        rest = full_step_flops(shape) - before
        return before + rest * len(plan.computed_rows) / shape.batch
    # rows computing every block beside the plan (VerifiedDuCa's fallback)
    extra = full_step_flops(shape) * len(plan.computed_rows) / shape.batch
    return extra + _module_step_flops(shape, plan, partial_tokens)


def _module_step_flops(shape: TrunkShape, plan, partial_tokens: Optional[dict]) -> float:
    n, L = shape.tokens, shape.caption_len
    attn = plan.actions[Kind.SPATIAL_ATTN] != Action.REUSE
    mlp = plan.actions[Kind.MLP]
    if attn:
        img_tokens = 0.0 if mlp == Action.REUSE else n
        return (shape.depth * _double_flops(shape, True, img_tokens, mlp != Action.REUSE)
                + shape.single_depth * _single_flops(shape, True, n + L))
    if mlp == Action.FULL:
        return (shape.depth * _double_flops(shape, False, n, True)
                + shape.single_depth * _single_flops(shape, False, n + L))
    if mlp == Action.PARTIAL:
        k = (partial_tokens or {}).get(Kind.MLP)
        if k is None:
            k = round(plan.ratios[Kind.MLP] * n)
        return (shape.depth * _double_flops(shape, False, k, False)
                + shape.single_depth * _single_flops(shape, False, k))
    return 0.0


# ----------------------------------------------------------------------- the reused step
def _double_sparse(runner, plan, img, txt, vec):
    block, kind = runner.block, runner.kind
    s1, c1, g1, s2, c2, g2 = _modulation(block.img_mod, vec)
    ts1, tc1, tg1, ts2, tc2, tg2 = _modulation(block.txt_mod, vec)
    A = runner.stored("attn", kind, img.shape, img.dtype)
    At = runner.stored("txt_attn", kind, txt.shape, txt.dtype)
    runner.count(kind, Action.REUSE)
    runner.count(kind, Action.REUSE)
    img = img + g1 * A
    txt = txt + tg1 * At
    act = plan.actions[Kind.MLP]
    runner.count(Kind.MLP, act)
    runner.count(Kind.MLP, Action.FULL if act == Action.FULL else Action.REUSE)
    if act == Action.FULL:
        M = block.img_mlp(_modulate(block.img_norm2(img), s2, c2))
        Mt = block.txt_mlp(_modulate(block.txt_norm2(txt), ts2, tc2))
        runner.record("mlp", Kind.MLP, M, img)
        runner.record("txt_mlp", Kind.MLP, Mt, txt)
    else:
        M = runner.stored("mlp", Kind.MLP, img.shape, img.dtype)
        Mt = runner.stored("txt_mlp", Kind.MLP, txt.shape, txt.dtype)
        if act == Action.PARTIAL:
            idx = runner.select(Kind.MLP, img)
            new = block.img_mlp(_modulate(block.img_norm2(gather_tokens(img, idx)), s2, c2))
            M = runner.overwrite("mlp", M, idx, new, img.dtype)
    return img + g2 * M, txt + tg2 * Mt


def _single_sparse(runner, plan, x, vec, txt_len: int):
    block, kind = runner.block, runner.kind
    shift, scale, gate = _modulation(block.modulation, vec)
    A = runner.stored("attn", kind, x.shape, x.dtype)
    runner.count(kind, Action.REUSE)
    act = plan.actions[Kind.MLP]
    runner.count(Kind.MLP, act)
    w1, b1 = _mlp_in(block)
    c = _hidden(block)
    w2, b2 = block.linear2.weight[:, c:], block.linear2.bias

    def mlp_share(tokens):
        h = F.linear(_modulate(block.pre_norm(tokens), shift, scale), w1, b1)
        return F.linear(block.mlp_act(h), w2, b2)

    if act == Action.FULL:
        M = mlp_share(x)
        runner.record("mlp", Kind.MLP, M, x[:, txt_len:])
    else:
        M = runner.stored("mlp", Kind.MLP, x.shape, x.dtype)
        if act == Action.PARTIAL:
            img = x[:, txt_len:]
            idx = runner.select(Kind.MLP, img)
            M = runner.overwrite("mlp", M, idx + txt_len, mlp_share(gather_tokens(img, idx)),
                                 x.dtype)
    return x + gate * (A + M)


def _booster_group(model: nn.Module):
    """The process group of upstream's distributed block processors when sequence
    parallelism is on (``processor.shard_config``), else None."""
    blocks = getattr(model, "double_blocks", None)
    shard = getattr(getattr(blocks[0], "processor", None), "shard_config", None) \
        if blocks is not None and len(blocks) else None
    if shard is None or not getattr(shard, "enable_sequence_parallelism", False):
        return None
    return getattr(shard, "sequence_parallel_process_group", None)


def _per_sample(value, batch: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch


def _rows(value, rows: torch.Tensor, batch: int):
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, rows, batch) for v in value)
    if _per_sample(value, batch):
        return value.index_select(0, rows.to(value.device))
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] != 1:
        raise RuntimeError(f"an MMDiT block argument has {value.shape[0]} rows for a batch of "
                           f"{batch}; the cache cannot run this block on a sub-batch")
    return value


@register_layout
class MMDiTLayout:
    """Open-Sora 2.0's MMDiT (this project's model and upstream's objects): ``double_blocks``
    then ``single_blocks``, each delegating to a processor (module docstring)."""

    name = "mmdit"
    requirement = ("'double_blocks' and 'single_blocks' (nn.ModuleLists of Open-Sora 2.0 / "
                   "Flux double- and single-stream blocks)")
    CALL_ARGS = ("img", "timesteps", "txt")
    TIMESTEP_SCALE = 1000.0
    TAPPED: Dict[str, tuple] = {}  # per block: :meth:`tapped`
    RECORDERS = {"linear2": (split_linear2, {"attn": None, "mlp": Kind.MLP})}
    FULL_CALL_KINDS = (Kind.MLP,)
    REGIONS: dict = {}
    DENSE_TAPS = True   # a computed block runs its forward with every tap set up beforehand
    paired = False

    @staticmethod
    def matches(model: nn.Module) -> bool:
        return isinstance(getattr(model, "double_blocks", None), nn.ModuleList) and \
            isinstance(getattr(model, "single_blocks", None), nn.ModuleList)

    def __init__(self, model: nn.Module):
        if not len(model.double_blocks):
            raise TypeError(f"apply_cache: {type(model).__name__}.double_blocks is empty; "
                            f"accepted: an MMDiT with at least one double-stream block")
        for kind, blocks, parts in (("double", model.double_blocks, _DOUBLE_PARTS),
                                    ("single", model.single_blocks, _SINGLE_PARTS)):
            for i, blk in enumerate(blocks):
                missing = [p for p in parts if not hasattr(blk, p)]
                if missing:
                    raise TypeError(f"{kind} block {i} ({type(blk).__name__}) lacks {missing}; "
                                    f"apply_cache needs Open-Sora 2.0 / Flux MMDiT blocks")
        self.doubles, self.singles = len(model.double_blocks), len(model.single_blocks)
        self.depth = self.doubles + self.singles
        self.txt_len = 0          # the text tokens this rank holds (noted at each double block)
        self._grid_key = None     # (img tokens, img_ids' storage) -> the grid read from img_ids
        self._grid = None

    # ------------------------------------------------------------- blocks
    def blocks(self, model: nn.Module) -> List[Tuple[str, nn.Module, int]]:
        return [(f"double_blocks.{i}", b, i) for i, b in enumerate(model.double_blocks)] + \
            [(f"single_blocks.{j}", b, self.doubles + j) for j, b in enumerate(model.single_blocks)]

    @staticmethod
    def tapped(block: nn.Module) -> Dict[str, tuple]:
        if is_double(block):
            return {"img_attn.proj": ("attn", None), "txt_attn.proj": ("txt_attn", None),
                    "img_mlp": ("mlp", Kind.MLP), "txt_mlp": ("txt_mlp", Kind.MLP)}
        return {"linear2": ("attn", None)}

    @staticmethod
    def attn_kind(block: nn.Module) -> Kind:
        return Kind.SPATIAL_ATTN

    @staticmethod
    def qkv_module(block: nn.Module) -> nn.Module:
        """Where the image tokens' value vectors are computed (v-norm scores)."""
        if is_double(block):
            attn = block.img_attn
            return attn.qkv if getattr(attn, "fused_qkv", True) and hasattr(attn, "qkv") \
                else attn.v_proj
        return block.linear1 if getattr(block, "fused_qkv", True) and hasattr(block, "linear1") \
            else block.v_mlp

    @staticmethod
    def map_module(block: nn.Module) -> Optional[nn.Module]:
        return None

    @staticmethod
    def check_maps(block: nn.Module) -> None:
        raise ValueError("cache scorer 'attention' needs attention maps, and Open-Sora 2.0's "
                         "MMDiT runs fused joint attention (no map is formed); choose scorer "
                         "'vnorm', 'random', 'norm' or 'similarity'")

    @staticmethod
    def token_sparse(block: nn.Module) -> bool:
        return True

    @staticmethod
    def sparse_plan(plan, kind) -> bool:
        """Every step that reuses the attention takes the token-sparse step."""
        return plan.actions[Kind.SPATIAL_ATTN] == Action.REUSE

    @staticmethod
    def sparse_applies(bound: dict) -> bool:
        return True

    @staticmethod
    def dense_plan(plan, block):
        """The plan a computed block runs: its attention is computed, so a single block's MLP is
        too, and a double block's image MLP is computed rather than cut to a token subset."""
        acts = dict(plan.actions)
        if acts[Kind.SPATIAL_ATTN] == Action.REUSE:
            return plan
        if not is_double(block) or acts[Kind.MLP] == Action.PARTIAL:
            acts[Kind.MLP] = Action.FULL
        if acts == dict(plan.actions):
            return plan
        return dataclasses.replace(plan, actions=acts, ratios={})

    def note_call(self, block: nn.Module, args, kwargs) -> None:
        if is_double(block):
            txt = args[1] if len(args) > 1 else kwargs.get("txt")
            if torch.is_tensor(txt):
                self.txt_len = int(txt.shape[1])

    def selection_input(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The tokens a selection picks from: a single block's image part."""
        return x if is_double(block) else x[:, self.txt_len:]

    # ------------------------------------------------------------- the call's shapes
    @staticmethod
    def latents(x):
        """The packed latents ``[B, L, C]`` as ``[B, C, 1, L, 1]`` (the run tracker's view)."""
        if torch.is_tensor(x) and x.dim() == 3:
            return x.transpose(1, 2)[:, :, None, :, None]
        return x

    def token_grid(self, img_ids: Optional[torch.Tensor], tokens: int) -> Tuple[int, int, int]:
        """(T, H, W) of the image tokens from ``img_ids`` [B, L, 3]
        (:func:`opensora_duca.models.mmdit.token_grid`, read back once per ids tensor); without
        ids, one frame of one row."""
        if not torch.is_tensor(img_ids) or img_ids.dim() != 3 or img_ids.shape[1] != tokens:
            return (1, 1, tokens)
        key = (tokens, img_ids.data_ptr(), img_ids._version)
        if key != self._grid_key:
            self._grid_key, self._grid = key, mmdit_token_grid(img_ids, tokens)
        return self._grid

    def trunk_shape(self, model: nn.Module, x, y, blk: nn.Module, arg=None):
        """The trunk's shape of a model call and the image tokens' grid (T, H, W); ``x`` is the
        tracker's view ``[B, C, 1, L, 1]``, ``y`` the text ``[B, L_txt, C_txt]``."""
        b, tokens = x.shape[0], x.shape[3]
        grid = self.token_grid(arg("img_ids") if arg is not None else None, tokens)
        first = model.double_blocks[0]
        shape = TrunkShape(batch=b, frames=grid[0], spatial=grid[1] * grid[2],
                           hidden=int(first.hidden_size), depth=self.doubles,
                           caption_len=int(y.shape[1]) if torch.is_tensor(y) else 0,
                           mlp_hidden=int(first.img_mlp[0].out_features), temporal=False,
                           rows=grid[1], width=grid[2], single_depth=self.singles)
        return shape, grid

    full_step_flops = staticmethod(full_step_flops)
    step_flops = staticmethod(step_flops)

    @staticmethod
    def sequence_parallel_group(model: nn.Module):
        """This project's model: its group; upstream's model under the booster's sequence
        parallelism: the group of its distributed processors; else None."""
        if getattr(model, "enable_sequence_parallelism", False):
            getter = getattr(model, "sequence_parallel_group", None)
            return getter() if callable(getter) else None
        return _booster_group(model)

    @staticmethod
    def check_group(model: nn.Module, size: int, picks_tokens: bool, adaptive: bool,
                    policy: str) -> None:
        """Upstream's booster splits the joint [txt; img] sequence in even chunks, not by
        latent rows: token selection and adaptive measures (per latent row, the same on every
        rank) cannot run on it; refuse them rather than let ranks disagree."""
        if size > 1 and _booster_group(model) is not None and (picks_tokens or adaptive):
            what = "picks tokens per latent row" if picks_tokens else \
                "decides from changes summed per latent row"
            raise ValueError(
                f"cache policy {policy!r} {what}, and upstream Open-Sora 2.0's sequence "
                f"parallelism (ColossalAI booster, sp_size={size}) splits the joint sequence in "
                f"even chunks that cut latent rows; accepted there: policies with fixed plans "
                f"and no token subsets (FORA, TrunkReuse, TaylorSeer, PAB, DuCa/ToCa with "
                f"fresh_ratio=0), or one GPU per clip, or this project's MMDiT with "
                f"enable_sequence_parallelism=True (whole rows per rank)")

    # ------------------------------------------------------------- the trunk's state
    @staticmethod
    def passthrough(block, args, kwargs):
        """What a skipped block returns: its inputs ((img, txt) for a double block)."""
        if is_double(block):
            img = args[0] if args else kwargs["img"]
            txt = args[1] if len(args) > 1 else kwargs["txt"]
            return img, txt
        return args[0] if args else kwargs["x"]

    @staticmethod
    def trunk_state(block, args, kwargs):
        """The trunk's hidden state at a block as the last block returns it: cat(txt, img)."""
        if is_double(block):
            img, txt = MMDiTLayout.passthrough(block, args, kwargs)
            return torch.cat((txt, img), 1)
        return args[0] if args else kwargs["x"]

    @staticmethod
    def with_sub(block, part: dict, sub) -> dict:
        """A sub-batch's hidden state into a block's arguments (a double block's output pair
        becomes a single block's cat(txt, img))."""
        if is_double(block):
            part["img"], part["txt"] = sub
        else:
            part["x"] = torch.cat((sub[1], sub[0]), 1) if isinstance(sub, tuple) else sub
        return part

    @staticmethod
    def args_rows(bound: dict, rows: torch.Tensor, batch: int) -> dict:
        return {k: _rows(v, rows, batch) for k, v in bound.items()}

    # ------------------------------------------------------------- scores and measures
    def vnorm_scores(self, block, qkv_out, attn_in, batch: int, name: str) -> torch.Tensor:
        """v-norm scores [B, N_img] of the image tokens from the recorded value projection."""
        c, heads = _hidden(block), int(block.num_heads)
        if is_double(block):
            v = qkv_out[..., 2 * c:3 * c] if qkv_out.shape[-1] >= 3 * c and \
                getattr(block.img_attn, "fused_qkv", True) and hasattr(block.img_attn, "qkv") \
                else qkv_out[..., :c]
        else:
            fused = getattr(block, "fused_qkv", True) and hasattr(block, "linear1")
            v = qkv_out[:, self.txt_len:, 2 * c:3 * c] if fused else \
                qkv_out[:, self.txt_len:, :c]
        return (1.0 - v.float().unflatten(-1, (heads, c // heads)).norm(dim=-1)).sum(-1)

    def modulated_input(self, block, img=None, txt=None, vec=None, pe=None, x=None, **_unused):
        """The deciding block's normalised image input under this step's modulation (TeaCache)."""
        if is_double(block):
            shift, scale = _modulation(block.img_mod, vec)[:2]
            return _modulate(block.img_norm1(img), shift, scale)
        shift, scale = _modulation(block.modulation, vec)[:2]
        return _modulate(block.pre_norm(x[:, self.txt_len:]), shift, scale)

    # ------------------------------------------------------------- reused step
    def sparse_step(self, runner, regions, plan, img=None, txt=None, vec=None, pe=None, x=None,
                    **_unused):
        if is_double(runner.block):
            return _double_sparse(runner, plan, img, txt, vec)
        return _single_sparse(runner, plan, x, vec, self.txt_len)
