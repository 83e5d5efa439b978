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

No block math is written here and no model attribute named: what the cache knows about the
block layout (tapped modules, the token-sparse reused step of the block class, where value
vectors and attention maps are) comes from the model family's layout adapter
(:mod:`.layouts`). The runner reads the step's context from its manager (plan, step, forecast
position, token grid, counters: :class:`.context.StepContext`), held weakly, and holds its
block weakly too, so a dropped model is freed without the cyclic garbage collector.
"""
from __future__ import annotations

import inspect
import math
import time
import types
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from ..utils.compile import CompileOptions, compile_region
from . import selection as sel
from .context import StepContext
from .layouts.base import tapped_modules
from .plan import Action, Kind, StepPlan
from .policies import Scorer
from .state import BlockState


@dataclass
class BlockSlot:
    """One patched block: where it sits and what it stores. The block is held weakly."""

    block_ref: Callable
    name: str            # e.g. "spatial_blocks.3"
    index: int           # position in call order (0 .. 2*depth-1)
    layer: int           # depth index
    is_last: bool
    state: BlockState

    @property
    def block(self) -> torch.nn.Module:
        return self.block_ref()


class Regions:
    """The per-block work the runner calls: the block's own forward and the functions of the
    layout's token-sparse reused step (``functions``: name -> function, set as attributes),
    compiled with ``opts`` (one compiled function per block class, shared by all its blocks)
    or, without options, as they are."""

    def __init__(self, opts: Optional[CompileOptions] = None,
                 functions: Optional[Dict[str, Callable]] = None):
        self.opts = opts
        self._blocks: Dict[type, Callable] = {}
        wrap = (lambda f: compile_region(f, opts)) if opts is not None else (lambda f: f)
        for name, fn in (functions or {}).items():
            setattr(self, name, wrap(fn))

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
    """Instance-level ``forward`` of one block. Holds its manager (the step context) and its
    block weakly: the model owns the manager and the block owns the runner, so strong
    back-pointers would make reference cycles through the block."""

    def __init__(self, manager: StepContext, slot: BlockSlot):
        self._manager = weakref.ref(manager)
        self.slot = slot
        self.layout = manager.layout
        block = slot.block
        self.kind = self.layout.attn_kind(block)
        self._forward = type(block).forward  # the class forward, called with the block
        self._signature = inspect.signature(types.MethodType(self._forward, block))
        self._input = next(iter(self._signature.parameters))  # the hidden states' name
        self.token_sparse = self.layout.token_sparse(block)
        self._tapped = {attr: (name, kind or self.kind)
                        for attr, (name, kind) in tapped_modules(self.layout, block).items()}
        lay = self.layout
        # the layout's hooks for blocks that take or return more than one hidden state
        self._passthrough = getattr(lay, "passthrough", None)
        self._state = getattr(lay, "trunk_state", None)
        self._with_sub = getattr(lay, "with_sub", None)
        self._note = getattr(lay, "note_call", None)
        self._sparse_plan = getattr(lay, "sparse_plan", None)
        self._dense_plan = getattr(lay, "dense_plan", None)
        self._dense_taps = bool(getattr(lay, "DENSE_TAPS", False))
        self._sel_input = getattr(lay, "selection_input", None)
        self.plan: Optional[StepPlan] = None  # armed while the block's own forward runs
        self.x_in: Optional[torch.Tensor] = None
        self.calls: dict = {}  # calls of each tapped module in the current forward
        self.taps: Dict[str, "ModuleTap"] = {}    # installed by the manager
        self.qkv_tap: Optional["ModuleTap"] = None
        self.map_tap: Optional["ModuleTap"] = None  # where attention maps pass (upstream)

    @property
    def m(self) -> StepContext:
        m = self._manager()
        if m is None:  # pragma: no cover - the manager is detached before it dies
            raise RuntimeError("the cache manager of this block no longer exists")
        return m

    @property
    def block(self) -> torch.nn.Module:
        return self.slot.block

    def original(self, *args, **kwargs):
        """The block's own (class) forward."""
        return self._forward(self.block, *args, **kwargs)

    def kind_of(self, attr: str) -> Kind:
        return self._tapped[attr][1]

    def action(self, attr: str) -> Action:
        return self.plan.actions[self.kind_of(attr)]

    # ------------------------------------------------------------ forward
    def __call__(self, *args, **kwargs):
        m = self.m
        plan = m.plan
        if plan is None:  # not inside a tracked model call: behave as the original block
            return self.original(*args, **kwargs)
        x = args[0] if args else kwargs[self._input]
        if self._note is not None:
            self._note(self.block, args, kwargs)
        index = self.slot.index
        ad = m.adaptive
        if plan.decide_at is not None:
            if index == 0:
                ad.trunk_in = x
            if index == plan.decide_at:
                state = x if self._state is None else self._state(self.block, args, kwargs)
                plan = m.decide(self.slot, x, self._bind(args, kwargs), state)
        if plan.residual_from is not None and index >= plan.residual_from:
            if plan.computed_rows:  # per-clip decisions: some rows compute these blocks
                m.counts.count_module("trunk", Action.PARTIAL)
                ad.sub = self._rows_forward(ad.sub, args, kwargs)
                if not self.slot.is_last:
                    out = self._skipped(args, kwargs)
                elif plan.others_from_trunk:  # the other clips take the trunk's forecast
                    out = torch.index_copy(m.trunk_output(x), 0, ad.rows, ad.sub)
                else:
                    out = ad.mixed_output(x, ad.sub, m.at)
                m.after_block(self.slot, out)
                return out
            m.counts.count_module("trunk", Action.REUSE)
            return ad.residual_output(x, m.at) if self.slot.is_last else \
                self._skipped(args, kwargs)
        if plan.skip_trunk:
            m.counts.count_module("trunk", Action.REUSE)
            return m.trunk_output(x) if self.slot.is_last else self._skipped(args, kwargs)
        if plan.computed_rows:  # VerifiedDuCa's fallback: these rows compute every block
            ad.sub = self._rows_forward(ad.sub, args, kwargs)
        bound = None
        if self.token_sparse and self._sparse_step_applies(plan):
            bound = self._bind(args, kwargs)
            if not self.layout.sparse_applies(bound):  # e.g. cross-attention per frame group
                bound = None
        if plan.is_full() and not m.stores_modules():
            out = m.regions.block(self.block)(self.block, *args, **kwargs) \
                if m.regions.compiled else self.original(*args, **kwargs)
        elif bound is not None:
            out = self.layout.sparse_step(self, m.regions, plan, **bound)
        elif self._dense_taps:
            dense = plan if self._dense_plan is None else self._dense_plan(plan, self.block)
            out = self._dense(dense, x, args, kwargs)
        elif m.regions.compiled and self._dense_compiles(plan, args, kwargs):
            out = self._dense(plan, x, args, kwargs)
        else:
            self.plan, self.x_in, self.calls = plan, x, {}
            try:
                out = self.original(*args, **kwargs)
            finally:
                self.plan, self.x_in = None, None
        if plan.computed_rows and self.slot.is_last:  # the others forecast every module
            out = torch.index_copy(out, 0, ad.rows, ad.sub)
        m.after_block(self.slot, out)
        return out

    def _sparse_step_applies(self, plan: StepPlan) -> bool:
        """Whether this step's plan is one the layout's token-sparse reused step runs."""
        if self._sparse_plan is not None:
            return self._sparse_plan(plan, self.kind)
        return (plan.actions[self.kind] == Action.REUSE
                and plan.actions[Kind.CROSS_ATTN] == Action.REUSE
                and plan.actions[Kind.MLP] in (Action.REUSE, Action.PARTIAL))

    def _skipped(self, args, kwargs):
        """What a block passed over returns: its input (or inputs, as the layout says)."""
        if self._passthrough is not None:
            return self._passthrough(self.block, args, kwargs)
        return args[0] if args else kwargs[self._input]

    def _rows_forward(self, sub: Optional[torch.Tensor], args, kwargs) -> torch.Tensor:
        """This block on the batch rows ``adaptive.rows`` only: its arguments cut to those
        samples (the layout's ``args_rows``), its input the rows' hidden states ``sub`` (the
        block's own input rows at the first block of the step's computed part)."""
        m = self.m
        bound = self._bind(args, kwargs)
        x = bound[self._input]
        part = self.layout.args_rows(bound, m.adaptive.rows, x.shape[0])
        if sub is not None:
            if self._with_sub is not None:
                part = self._with_sub(self.block, part, sub)
            else:
                part[self._input] = sub
        if m.regions.compiled:
            return m.regions.block(self.block)(self.block, **part)
        return self.original(**part)

    def _dense_compiles(self, plan: StepPlan, args, kwargs) -> bool:
        """Whether the block's compiled forward can run this step with its taps recording or
        reusing: no token subset, no attention-map scores (the 'math' backend hands them back
        outside the graph), each tapped module called once (not Open-Sora 1.3's cross-attention
        per frame group, ``mask_index``)."""
        if self.m.policy.scorer == Scorer.ATTENTION or any(
                plan.actions[self.kind_of(a)] == Action.PARTIAL for a in self.taps):
            return False
        return self.layout.sparse_applies(self._bind(args, kwargs))

    def _dense(self, plan: StepPlan, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        """The block's compiled forward, each tapped module computed (its output recorded) or
        reused; the features are stored afterwards, outside the graph."""
        m, st = self.m, self.slot.state
        for attr, tap in self.taps.items():
            kind = self.kind_of(attr)
            if tap.recorder is not None:  # one module recording several kinds' features
                for part_kind in tap.parts.values():
                    k = part_kind or self.kind
                    m.counts.count_module(k, plan.actions[k])
                tap.mode = "record"
                continue
            m.counts.count_module(kind, plan.actions[kind])
            if plan.actions[kind] == Action.REUSE:
                tap.value = self._stored(self._tapped[attr][0], kind, None, x.dtype)
                tap.mode = "reuse"
            else:
                tap.mode = "record"
        capture = self.qkv_tap if (self.qkv_tap is not None and m.needs_scores()
                                   and plan.actions[self.kind] == Action.FULL) else None
        if capture is not None:
            capture.mode = "record"
        # the tokens a selection picks from (e.g. an MMDiT single block's image part)
        self.x_in = x if self._sel_input is None else self._sel_input(self.block, x)
        try:
            out = m.regions.block(self.block)(self.block, *args, **kwargs) \
                if m.regions.compiled else self.original(*args, **kwargs)
            for attr, tap in self.taps.items():
                if tap.mode == "record":
                    self._recorded(attr, tap.value)
            if capture is not None:
                attn_tap = self.taps.get("attn")
                st.put("score", self._vnorm(capture.value,
                                            None if attn_tap is None else attn_tap.input))
        finally:
            for tap in list(self.taps.values()) + ([capture] if capture is not None else []):
                tap.clear()
            self.x_in = None
        return out

    def _recorded(self, attr: str, out, call: int = 0) -> None:
        """Store a fully computed module output (and what token selection needs of it); a
        recorder's parts (a dict of features) each under its own name and kind."""
        if isinstance(out, dict):
            parts = self.taps[attr].parts
            for name, value in out.items():
                kind = parts[name] or self.kind
                self._store(name, value, kind, call)
                if kind != self.kind:
                    self._mark_full(kind)
            return
        m, kind = self.m, self.kind_of(attr)
        self._store(self._tapped[attr][0], out, kind, call)
        if attr != "attn":
            self._mark_full(kind)
        if attr == "mlp" and m.policy.scorer == Scorer.SIMILARITY and m.uses_selection(kind):
            self.slot.state.put("x_ref", self.x_in)

    def _vnorm(self, qkv_out: torch.Tensor, attn_in: torch.Tensor) -> torch.Tensor:
        """v-norm token scores [B, N] from the recorded qkv projection output of the
        self-attention, which was called with ``attn_in``."""
        return self.layout.vnorm_scores(self.block, qkv_out, attn_in, self.m.shape.batch,
                                        f"{self.slot.name}.attn")

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
        name = self._tapped[attr][0]
        call = self.calls.get(attr, 0)  # a module may be called more than once per forward
        self.calls[attr] = call + 1
        inp = args[0] if args else next(iter(kwargs.values()))
        m.counts.count_module(kind, act)
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
        new = original(sel.gather_tokens(inp.reshape(b, -1, c), idx), *args[1:], **kwargs)
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
            if stored.data_ptr() != feature.terms[0].data.data_ptr():
                # a decoded copy of an encoded store: the same (quantised) tokens go into it,
                # instead of decoding the whole store again
                codec = feature.codec
                _scatter(stored, idx, codec.decode(codec.encode(new), dtype))
        else:
            if m.check_pending:  # VerifiedDuCa: the step's check
                m.check_forecast(stored, idx, new)
            _scatter(stored, idx, new)
        m.counts.bookkeeping_s += time.perf_counter() - t0
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
        """Run the self-attention -> (its output, its attention map [B', h, n, n]), through the
        layout (which knows where the map is: handed back by the module, or recorded by the
        map tap where it passes)."""
        out, amap = self.layout.attention_with_map(self.block, self.map_tap,
                                                   lambda: original(*args, **kwargs))
        if amap is None:
            raise RuntimeError(f"scorer 'attention': {self.slot.name}.attn computed no attention "
                               f"map (a fused kernel ran: flash-attn or scaled_dot_product_"
                               f"attention); build the model with enable_flash_attn=False or "
                               f"choose scorer 'vnorm'")
        return out, amap

    def _received(self, amap: torch.Tensor, attn_in: torch.Tensor) -> torch.Tensor:
        """Attention received per token [B, N] from an attention map of the self-attention."""
        return self.layout.map_scores(self.block, amap, attn_in, self.m.shape.batch,
                                      f"{self.slot.name}.attn")

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
        m.counts.count_partial(idx.shape[1])
        m.counts.bookkeeping_s += time.perf_counter() - t0
        return idx

    # ------------------------------------------------------------ the layout's reused step
    stored = _stored        # the stored (or forecast) feature, checked against a shape
    overwrite = _overwrite  # the stored value with recomputed tokens written in

    def count(self, kind: Kind, action: Action) -> None:
        self.m.counts.count_module(kind, action)

    def record(self, name: str, kind: Kind, value: torch.Tensor, x_in: torch.Tensor) -> None:
        """A layout's reused step computed ``name`` in full (for every token of ``x_in``)."""
        self._store(name, value, kind)
        self.x_in = x_in
        try:
            self._mark_full(kind)
        finally:
            self.x_in = None

    def select(self, kind: Kind, x: torch.Tensor) -> torch.Tensor:
        """The tokens [B, k] a token-subset module of ``kind`` recomputes, for block input x."""
        self.x_in = x
        try:
            return self._select(kind, self._ratio(kind))
        finally:
            self.x_in = None


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
        # held weakly: the module keeps its tap, which must not keep the runner (and with it
        # the stored features) alive
        self._runner = None if runner is None else weakref.ref(runner)
        self.attr = attr
        self.mode = "off"
        self.value: Optional[torch.Tensor] = None
        self.input: Optional[torch.Tensor] = None  # first argument of the recorded call
        # a layout's recorder: (module, *args) -> (output, {feature: value}) with ``parts``
        # {feature: kind (None: the block's attention kind)}
        self.recorder: Optional[Callable] = None
        self.parts: Dict[str, Optional[Kind]] = {}

    @property
    def runner(self) -> Optional[BlockRunner]:
        return None if self._runner is None else self._runner()

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
    if tap.mode == "record" and tap.recorder is not None:
        out, tap.value = tap.recorder(module, *args, **kwargs)
        tap.input = args[0] if args else next(iter(kwargs.values()), None)
        return out
    out = type(module).forward(module, *args, **kwargs)
    if tap.mode == "record":
        tap.value = out
        tap.input = args[0] if args else next(iter(kwargs.values()), None)
    return out
