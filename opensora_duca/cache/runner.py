"""The cache-aware block forward.

The block's own ``forward`` is the single definition of the block math. The cache installs two
kinds of instance-level ``forward`` on a block (never on its class):

* on the block, a :class:`BlockRunner`: outside a tracked model call it is the original
  forward; inside one it skips the block on an aggressive step, takes the token-sparse path on a
  conservative step, and otherwise runs the block's own forward with its taps armed;
* on the block's ``attn``, ``cross_attn`` and ``mlp``, a :class:`ModuleTap`: when armed it
  computes the module and stores its output (FULL), returns the stored output (REUSE), or
  recomputes the module on a token subset and writes it into the stored output (PARTIAL).

So attention backends, sequence-parallel attention classes, checkpoint weights and the block's
op order stay untouched; a reused module issues no collective because it is not called.

The only block math written here is the token-sparse conservative step (self- and
cross-attention reused, MLP reused or on a token subset), for the Open-Sora 1.2 block layout
(``TOKEN_SPARSE_BLOCKS``; other blocks take it through their own forward): every token takes
the residual x2 = x + g1 * A + CA (two passes, associated as the block does), the selected
tokens of x2 are gathered (LayerNorm and modulation are per token) and only their MLP is
computed, and every token then takes x2 + g2 * M (one fused pass). It needs the block's
modulation, which ``models.stdit3.block_modulation`` defines for the Open-Sora 1.2 layout.
"""
from __future__ import annotations

import inspect
import math
import time
import types
import weakref
from typing import TYPE_CHECKING, Callable, Dict, Optional

import torch

from ..models.layers import gated_add, modulate
from ..models.stdit3 import block_modulation
from ..utils.compile import CompileOptions, compile_region
from . import selection as sel
from .layouts import stdit3 as layout
from .plan import Action, Kind, StepPlan
from .policies import Scorer

if TYPE_CHECKING:  # pragma: no cover
    from .manager import BlockSlot, CacheManager

_TAPPED = {"attn": "attn", "cross_attn": "cross", "mlp": "mlp"}  # submodule -> stored feature
_TAPPED_KIND = {"cross_attn": Kind.CROSS_ATTN, "mlp": Kind.MLP}  # "attn": the block's own kind
# block classes (ours and upstream Open-Sora 1.2's, by name) whose forward is the math that
# BlockRunner._conservative reproduces; any other block runs conservative steps through its own
# forward with the taps armed (same result, without the token-sparse saving)
TOKEN_SPARSE_BLOCKS = ("STDiT3Block",)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, C] at idx [B, k] -> [B, k, C]."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _gather_mod(m: torch.Tensor, idx: torch.Tensor, s_local: int) -> torch.Tensor:
    """Modulation [B, T|1, 1, C] at the frames of tokens idx [B, k] -> [B, k|1, C]."""
    if m.shape[1] == 1:
        return m[:, 0]
    return gather_tokens(m[:, :, 0], idx // s_local)


def _own_forward(module: torch.nn.Module, *args):
    """The module's class forward (not a tap installed on the instance)."""
    return type(module).forward(module, *args)


def conservative_residual(x, g1, A, CA):
    """Conservative step, every token: x + g1 * A + CA, with the block's own association
    (``gated_add`` then the cross-attention residual), from the stored self-attention A and
    cross-attention CA ([B, T, S, C] views) -> [B, T, S, C] (token-major)."""
    return gated_add(x.view(A.shape), g1, A) + CA


def conservative_mlp_tokens(block, x2, sh2, sc2, idx, S: int):
    """Conservative step, MLP on a token subset: the selected tokens idx [B, k] of the
    residual x2 [B, T, S, C] (:func:`conservative_residual`) take norm2, modulation (sh2, sc2
    of ``block_modulation``) and the MLP -> [B, k, C]. LayerNorm and modulation are per token,
    so only the selected are computed."""
    xs = gather_tokens(x2.view(x2.shape[0], -1, x2.shape[-1]), idx)
    hs = modulate(block.norm2(xs), _gather_mod(sh2, idx, S), _gather_mod(sc2, idx, S))
    return _own_forward(block.mlp, hs)


def conservative_output(x2, g2, M):
    """Conservative step, every token: x2 + g2 * M (M [B, T, S, C] stored, with the
    recomputed tokens written in) -> [B, N, C]."""
    b, T, S, c = x2.shape
    return gated_add(x2, g2, M).view(b, T * S, c)


class Regions:
    """The per-block work the runner calls: the block's own forward and the three functions of the
    token-sparse conservative step, compiled with ``opts`` (one compiled function per block
    class, shared by all its blocks) or, without options, as they are."""

    def __init__(self, opts: Optional[CompileOptions] = None):
        self.opts = opts
        self._blocks: Dict[type, Callable] = {}
        wrap = (lambda f: compile_region(f, opts)) if opts is not None else (lambda f: f)
        self.residual = wrap(conservative_residual)
        self.mlp_tokens = wrap(conservative_mlp_tokens)
        self.output = wrap(conservative_output)

    @property
    def compiled(self) -> bool:
        return self.opts is not None

    def block(self, block: torch.nn.Module) -> Callable:
        """The compiled class forward of ``block``, called as ``fn(block, *args, **kwargs)``."""
        cls = type(block)
        fn = self._blocks.get(cls)
        if fn is None:
            fn = self._blocks[cls] = compile_region(cls.forward, self.opts)
        return fn


def _scatter(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """dst (any [B, ..., C] layout in token order) at idx [B, k] <- src [B, k, C], in place."""
    b, c = dst.shape[0], dst.shape[-1]
    dst.view(b, -1, c).scatter_(1, idx[..., None].expand(-1, -1, c), src.to(dst.dtype))


class BlockRunner:
    """Instance-level ``forward`` of one block. Holds its manager weakly (the model owns the
    manager; a strong back-pointer would make a reference cycle through the block)."""

    def __init__(self, manager: "CacheManager", slot: "BlockSlot"):
        self._manager = weakref.ref(manager)
        self.slot = slot
        self.block = slot.block
        self.kind = Kind.TEMPORAL_ATTN if getattr(slot.block, "temporal", False) \
            else Kind.SPATIAL_ATTN
        self._signature = inspect.signature(slot.original)
        self.token_sparse = type(slot.block).__name__ in TOKEN_SPARSE_BLOCKS
        self.plan: Optional[StepPlan] = None  # armed while the block's own forward runs
        self.x_in: Optional[torch.Tensor] = None
        self.calls: dict = {}  # calls of each tapped module in the current forward
        self.taps: Dict[str, "ModuleTap"] = {}    # installed by the manager
        self.qkv_tap: Optional["ModuleTap"] = None
        self.map_tap: Optional["ModuleTap"] = None  # upstream attention's attn_drop (maps)

    @property
    def m(self) -> "CacheManager":
        m = self._manager()
        if m is None:  # pragma: no cover - the manager is detached before it dies
            raise RuntimeError("the cache manager of this block no longer exists")
        return m

    def kind_of(self, attr: str) -> Kind:
        return _TAPPED_KIND.get(attr, self.kind)

    def action(self, attr: str) -> Action:
        return self.plan.actions[self.kind_of(attr)]

    # ------------------------------------------------------------ forward
    def __call__(self, *args, **kwargs):
        m = self.m
        plan = m.plan
        if plan is None:  # not inside a tracked model call: behave as the original block
            return self.slot.original(*args, **kwargs)
        x = args[0] if args else kwargs["x"]
        index = self.slot.index
        if plan.decide_at is not None:
            if index == 0:
                m._trunk_in = x
            if index == plan.decide_at:
                plan = m.decide(self.slot, x, self._bind(args, kwargs)
                                if m.policy.measure == "modulated_input" else None)
        if plan.residual_from is not None and index >= plan.residual_from:
            if plan.computed_rows:  # per-sample decisions: some rows compute these blocks
                m.count_module("trunk", Action.PARTIAL)
                m._sub = self._rows_forward(m._sub, args, kwargs)
                out = m.mixed_output(x, m._sub) if self.slot.is_last else x
                m.after_block(self.slot, out)
                return out
            m.count_module("trunk", Action.REUSE)
            return m.residual_output(x) if self.slot.is_last else x
        if plan.skip_trunk:
            m.count_module("trunk", Action.REUSE)
            return m.trunk_output(x) if self.slot.is_last else x
        bound = None
        if (self.token_sparse and plan.actions[self.kind] == Action.REUSE
                and plan.actions[Kind.CROSS_ATTN] == Action.REUSE
                and plan.actions[Kind.MLP] in (Action.REUSE, Action.PARTIAL)):
            bound = self._bind(args, kwargs)
            if bound.get("mask_index"):  # i2v / v2v: cross-attention per frame group
                bound = None
        if plan.is_full() and not m.stores_modules():
            out = m.regions.block(self.block)(self.block, *args, **kwargs) \
                if m.regions.compiled else self.slot.original(*args, **kwargs)
        elif bound is not None:
            out = self._conservative(plan, **bound)
        elif m.regions.compiled and self._dense_compiles(plan, args, kwargs):
            out = self._dense(plan, x, args, kwargs)
        else:
            self.plan, self.x_in, self.calls = plan, x, {}
            try:
                out = self.slot.original(*args, **kwargs)
            finally:
                self.plan, self.x_in = None, None
        m.after_block(self.slot, out)
        return out

    def _rows_forward(self, sub: Optional[torch.Tensor], args, kwargs) -> torch.Tensor:
        """This block on the batch rows ``m._rows`` only: its arguments cut to those samples
        (:func:`layouts.stdit3.block_args_rows`), its input the rows' hidden states ``sub``
        (the block's own input rows at the first block of the step's computed part)."""
        m = self.m
        bound = self._bind(args, kwargs)
        x = bound["x"]
        part = layout.block_args_rows(bound, m._rows, x.shape[0])
        if sub is not None:
            part["x"] = sub
        if m.regions.compiled:
            return m.regions.block(self.block)(self.block, **part)
        return self.slot.original(**part)

    def _dense_compiles(self, plan: StepPlan, args, kwargs) -> bool:
        """Whether the block's compiled forward can run this step with its taps recording or
        reusing: no token subset, no attention-map scores (the 'math' backend hands them back
        outside the graph), each tapped module called once (not Open-Sora 1.3's cross-attention
        per frame group, ``mask_index``)."""
        if self.m.policy.scorer == Scorer.ATTENTION or any(
                plan.actions[self.kind_of(a)] == Action.PARTIAL for a in self.taps):
            return False
        return "mask_index" not in self._signature.parameters or \
            not self._bind(args, kwargs).get("mask_index")

    def _dense(self, plan: StepPlan, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        """The block's compiled forward, each tapped module computed (its output recorded) or
        reused; the features are stored afterwards, outside the graph."""
        m, st = self.m, self.slot.state
        for attr, tap in self.taps.items():
            kind = self.kind_of(attr)
            m.count_module(kind, plan.actions[kind])
            if plan.actions[kind] == Action.REUSE:
                tap.value, tap.mode = self._stored(_TAPPED[attr], kind, None, x.dtype), "reuse"
            else:
                tap.mode = "record"
        capture = self.qkv_tap if (self.qkv_tap is not None and m.needs_scores()
                                   and plan.actions[self.kind] == Action.FULL) else None
        if capture is not None:
            capture.mode = "record"
        self.x_in = x
        try:
            out = m.regions.block(self.block)(self.block, *args, **kwargs)
            for attr, tap in self.taps.items():
                if tap.mode == "record":
                    self._recorded(attr, tap.value)
            if capture is not None:
                st.put("score", self._vnorm(capture.value, self.taps["attn"].input))
        finally:
            for tap in list(self.taps.values()) + ([capture] if capture is not None else []):
                tap.clear()
            self.x_in = None
        return out

    def _recorded(self, attr: str, out: torch.Tensor, call: int = 0) -> None:
        """Store a fully computed module output (and what token selection needs of it)."""
        m, kind = self.m, self.kind_of(attr)
        self._store(_TAPPED[attr], out, kind, call)
        if attr != "attn":
            self._mark_full(kind)
        if attr == "mlp" and m.policy.scorer == Scorer.SIMILARITY and m.uses_selection(kind):
            self.slot.state.put("x_ref", self.x_in)

    def _vnorm(self, qkv_out: torch.Tensor, attn_in: torch.Tensor) -> torch.Tensor:
        """v-norm token scores [B, N] from the recorded qkv projection output of the
        self-attention, which was called with ``attn_in``."""
        return layout.attention_token_scores(
            sel.vnorm_rows(qkv_out, self.block.attn.num_heads), attn_in, self.block.attn,
            self.m._shape.batch, self.temporal, f"{self.slot.name}.attn")

    def _bind(self, args, kwargs) -> dict:
        """The block's forward arguments by name (defaults filled in)."""
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    # ------------------------------------------------------------ the taps' work
    def run_module(self, attr: str, original, args, kwargs):
        """What a tapped submodule returns inside an armed block forward."""
        m = self.m
        act = self.action(attr)
        kind = self.kind_of(attr)
        name = _TAPPED[attr]
        call = self.calls.get(attr, 0)  # a module may be called more than once per forward
        self.calls[attr] = call + 1
        inp = args[0] if args else next(iter(kwargs.values()))
        m.count_module(kind, act)
        if act == Action.FULL:
            out = self._self_attn(original, args, kwargs) if attr == "attn" else \
                original(*args, **kwargs)
            self._recorded(attr, out, call)
            return out
        stored = self._stored(name, kind, inp.shape, inp.dtype, call)
        if act == Action.REUSE:
            return stored
        b, c = inp.shape[0], inp.shape[-1]
        if attr == "attn" or inp.numel() != self.x_in.numel():
            raise ValueError(f"{kind} of block {self.slot.name} cannot be recomputed on a token "
                             f"subset at step {m.step}: it does not see every token of the block "
                             f"(self-attention, or a call on a frame group)")
        idx = self._select(kind, self._ratio(kind))
        new = original(gather_tokens(inp.reshape(b, -1, c), idx), *args[1:], **kwargs)
        return self._overwrite(name, stored, idx, new, inp.dtype, call)

    def _overwrite(self, name: str, stored: torch.Tensor, idx: torch.Tensor, new: torch.Tensor,
                   dtype: torch.dtype, call: int = 0) -> torch.Tensor:
        """The reused (or forecast) value ``stored`` with the recomputed tokens ``new`` at
        ``idx``. Plain reuse writes them into the stored feature, so they persist until the next
        full step; a forecast is a fresh tensor and takes them for this step only."""
        m, feature = self.m, self.slot.state.feature(name, call)
        t0 = time.perf_counter()
        if feature.order == 0:
            feature.scatter_(idx, new)
            stored = feature.value(m.at, dtype)
        else:
            _scatter(stored, idx, new)
        m.bookkeeping_s += time.perf_counter() - t0
        return stored

    def _self_attn(self, original, args, kwargs):
        """Full self-attention; captures this block's token scores when a selection needs them."""
        m, st = self.m, self.slot.state
        scorer = m.policy.scorer if m.needs_scores() else None
        attn_in = args[0] if args else next(iter(kwargs.values()))
        if scorer == Scorer.ATTENTION:
            out, amap = self._attention_map(original, args, kwargs)
            st.put("score", self._received(amap, attn_in))
            return out
        if scorer == Scorer.VNORM:
            self.qkv_tap.mode = "record"
            try:
                out = original(*args, **kwargs)
                st.put("score", self._vnorm(self.qkv_tap.value, attn_in))
            finally:
                self.qkv_tap.clear()
            return out
        return original(*args, **kwargs)

    def _attention_map(self, original, args, kwargs):
        """Run the self-attention -> (its output, its attention map [B', h, n, n]): this
        project's attention hands the map back (``keep_attn_map``); upstream's non-fused path
        passes it through its ``attn_drop`` module, where a tap records it."""
        attn = self.block.attn
        if self.map_tap is None:  # this project's attention module
            attn.keep_attn_map = True
            try:
                out = original(*args, **kwargs)
            finally:
                attn.keep_attn_map = False
            amap, attn.last_attn_map = attn.last_attn_map, None
            return out, amap
        self.map_tap.mode = "record"
        try:
            out = original(*args, **kwargs)
            amap = self.map_tap.value
        finally:
            self.map_tap.clear()
        if amap is None:
            raise RuntimeError(f"scorer 'attention': {self.slot.name}.attn computed no attention "
                               f"map (a fused kernel ran: flash-attn or scaled_dot_product_"
                               f"attention); build the model with enable_flash_attn=False or "
                               f"choose scorer 'vnorm'")
        return out, amap

    def _received(self, amap: torch.Tensor, attn_in: torch.Tensor) -> torch.Tensor:
        """Attention received per token [B, N] from an attention map of the self-attention."""
        batch = self.m._shape.batch
        rows = layout.received_per_row(amap, attn_in, self.block.attn, batch)
        return layout.attention_token_scores(rows, attn_in, self.block.attn, batch,
                                             self.temporal, f"{self.slot.name}.attn",
                                             others="'vnorm', 'random', 'norm' or 'similarity'")

    @property
    def temporal(self) -> bool:
        return self.kind == Kind.TEMPORAL_ATTN

    # ------------------------------------------------------------ stored features
    def _store(self, name: str, value: torch.Tensor, kind: Kind, call: int = 0) -> None:
        if self.m.stores(kind):
            self.slot.state.feature(name, call).update(value, self.m.at)

    def _mark_full(self, kind: Kind) -> None:
        m = self.m
        if m.stores(kind) and m.uses_selection(kind):
            st, shape = self.slot.state, self.x_in.shape[:2]
            last = st.last_step.get(kind)
            if last is None or last.shape != shape:
                st.last_step[kind] = torch.full(shape, m.step, dtype=torch.long,
                                                device=self.x_in.device)
            else:
                last.fill_(m.step)

    def _stored(self, name: str, kind: Kind, shape, dtype: torch.dtype, call: int = 0,
                same_size: bool = False) -> torch.Tensor:
        """The stored (or forecast) feature ``name`` in ``dtype``; it must have ``shape`` (with
        ``same_size``: as many elements, returned as stored; None: any shape)."""
        feature = self.slot.state.feature(name, call)
        ok = feature.shape is not None and (
            shape is None or tuple(feature.shape) == tuple(shape)
            or (same_size and math.prod(feature.shape) == math.prod(shape)))
        if not ok:
            what = "anything" if shape is None else f"anything of shape {tuple(shape)}"
            raise RuntimeError(f"block {self.slot.name}: the plan reuses {kind} at step "
                               f"{self.m.step} but {what} was not stored "
                               f"(policy {self.m.policy.name!r})")
        return feature.value(self.m.at, dtype)

    # ------------------------------------------------------------ token selection
    def _ratio(self, kind: Kind) -> float:
        m = self.m
        r = m.plan.ratios[kind]
        return min(1.0, r * m.policy.ratio_factor(m.step, m.num_steps, self.slot.layer, m.depth))

    def _select(self, kind: Kind, ratio: float) -> torch.Tensor:
        m, st, pol, x_in = self.m, self.slot.state, self.m.policy, self.x_in
        t0 = time.perf_counter()
        grid = m.grid_for(x_in.shape[1])
        scorer = pol.scorer
        if scorer in (Scorer.VNORM, Scorer.ATTENTION):
            if st.score is None:
                raise RuntimeError(f"{scorer} scores of block {self.slot.name} are missing: a "
                                   f"token-subset step needs a fully computed self-attention "
                                   f"before it in the same run")
            base = st.score
        elif scorer == Scorer.RANDOM:
            part, parts = m.batch_part
            base = sel.random_scores(x_in.shape[0], grid, pol.seed, m.step, self.slot.index,
                                     x_in.device, batch_offset=part * x_in.shape[0],
                                     batch_total=parts * x_in.shape[0])
        elif scorer == Scorer.SIMILARITY:
            if st.x_ref is None:
                raise RuntimeError(f"similarity scores of block {self.slot.name} need a fully "
                                   f"computed MLP step before the token-subset step")
            base = 1 - torch.nn.functional.cosine_similarity(x_in.float(), st.x_ref.float(),
                                                             dim=-1)
        else:  # norm: feature norm of the block input
            base = x_in.float().norm(dim=-1)
        score = sel.normalise_rows(base, grid)
        last = st.last_step.get(kind)
        if pol.staleness_bonus and last is not None:
            score = score + pol.staleness_bonus * (m.step - last).float() / 3.0
        idx = sel.select_tokens(score, ratio, grid, pol.cfg_shared_selection)
        if last is not None:
            last.scatter_(1, idx, m.step)
        m.count_partial(idx.shape[1])
        m.bookkeeping_s += time.perf_counter() - t0
        return idx

    # ------------------------------------------------------------ token-sparse step
    def _conservative(self, plan: StepPlan, x, y, t, mask=None, x_mask=None, t0=None, T=None,
                      S=None, **_unused):
        """Self- and cross-attention reused, MLP reused or recomputed on the selected tokens."""
        m, block, regions = self.m, self.block, self.m.regions
        b, n, c = x.shape
        # as many elements as [(B S), T, C] / [(B T), S, C], in that memory order (upstream
        # 1.3's temporal window attention returns [B, H, W, T, C])
        attn_shape = (b * S, T, c) if self.temporal else (b * T, S, c)
        A = self._attn_tokens(self._stored("attn", self.kind, attn_shape, x.dtype,
                                           same_size=True), b, T, S)
        CA = self._stored("cross", Kind.CROSS_ATTN, x.shape, x.dtype).view(b, T, S, c)
        M = self._stored("mlp", Kind.MLP, x.shape, x.dtype, same_size=True)
        m.count_module(self.kind, Action.REUSE)
        m.count_module(Kind.CROSS_ATTN, Action.REUSE)
        m.count_module(Kind.MLP, plan.actions[Kind.MLP])
        # the block's six modulation vectors, computed once for the three regions
        _, _, g1, sh2, sc2, g2 = block_modulation(block.scale_shift_table, t, x_mask, t0)
        x2 = regions.residual(x, g1, A, CA)
        if plan.actions[Kind.MLP] == Action.PARTIAL:
            self.x_in = x
            try:
                idx = self._select(Kind.MLP, self._ratio(Kind.MLP))
            finally:
                self.x_in = None
            new = regions.mlp_tokens(block, x2, sh2, sc2, idx, S)
            M = self._overwrite("mlp", M, idx, new, x.dtype)
        return regions.output(x2, g2, M.view(b, T, S, c))

    def _attn_tokens(self, a: torch.Tensor, b: int, T: int, S: int) -> torch.Tensor:
        """Stored self-attention output (as the attention module returned it) as [B, T, S, C]
        (a view: temporal blocks keep [(B S), T, C])."""
        c = a.shape[-1]
        if self.temporal:
            return a.view(b, S, T, c).transpose(1, 2)
        return a.view(b, T, S, c)


def modulated_input(block, x, y=None, t=None, mask=None, x_mask=None, t0=None, T=None, S=None,
                    **_unused) -> torch.Tensor:
    """The block's normalised input modulated by the timestep (TeaCache's measured signal),
    [B, T*S, C], with the Open-Sora 1.2 modulation layout."""
    b, n, c = x.shape
    sh1, sc1 = block_modulation(block.scale_shift_table, t, x_mask, t0)[:2]
    return modulate(block.norm1(x.view(b, T, S, c)), sh1, sc1).view(b, n, c)


class ModuleTap:
    """State of the instance-level ``forward`` of a block's ``attn`` / ``cross_attn`` / ``mlp``
    (and of ``attn.qkv`` when v-norm scores are captured), kept on the module as ``_duca_tap``.

    ``mode`` says what the forward does: "off" — the module's own forward, or, while the block's
    runner is armed, :meth:`BlockRunner.run_module`; "record" — its own forward, keeping the
    output in ``value``; "reuse" — return ``value``. The forward is installed as a bound method
    of one module-level function and keeps no other Python state, so a compiled block forward
    is the same graph for every block of a type (torch.compile guards the identity of a called
    object, not of attributes it reads)."""

    def __init__(self, runner: Optional[BlockRunner], attr: str):
        self.runner, self.attr = runner, attr
        self.mode = "off"
        self.value: Optional[torch.Tensor] = None
        self.input: Optional[torch.Tensor] = None  # first argument of the recorded call

    def install(self, module: torch.nn.Module) -> None:
        module._duca_tap = self
        module.forward = types.MethodType(_tapped_forward, module)

    @staticmethod
    def remove(module: torch.nn.Module) -> None:
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_duca_tap", None)

    def clear(self) -> None:
        self.mode, self.value, self.input = "off", None, None


def _tapped_forward(module, *args, **kwargs):
    tap = module._duca_tap
    if tap.mode == "reuse":
        return tap.value
    if tap.mode == "off" and tap.runner is not None and tap.runner.plan is not None:
        return tap.runner.run_module(tap.attr, types.MethodType(type(module).forward, module),
                                     args, kwargs)
    out = type(module).forward(module, *args, **kwargs)
    if tap.mode == "record":
        tap.value = out
        tap.input = args[0] if args else next(iter(kwargs.values()), None)
    return out
