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
(``TOKEN_SPARSE_BLOCKS``; other blocks take it through their own forward): the selected tokens are gathered first (LayerNorm
and modulation are per token), only their trajectory is computed, and every token then takes
x + g1 * A + CA + g2 * M in two fused passes. It needs the block's modulation, which
``models.stdit3.block_modulation`` defines for the Open-Sora 1.2 block layout.
"""
from __future__ import annotations

import inspect
import math
import time
import weakref
from typing import TYPE_CHECKING, Optional

import torch

from ..models.stdit3 import block_modulation
from . import selection as sel
from .plan import Action, Kind, StepPlan
from .policies import Scorer

if TYPE_CHECKING:  # pragma: no cover
    from .manager import BlockSlot, CacheManager

_TAPPED = {"attn": "attn", "cross_attn": "cross", "mlp": "mlp"}  # submodule -> stored feature
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

    @property
    def m(self) -> "CacheManager":
        m = self._manager()
        if m is None:  # pragma: no cover - the manager is detached before it dies
            raise RuntimeError("the cache manager of this block no longer exists")
        return m

    def action(self, attr: str) -> Action:
        kind = {"attn": self.kind, "cross_attn": Kind.CROSS_ATTN, "mlp": Kind.MLP}[attr]
        return self.plan.actions[kind]

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
            m.count_module("trunk", Action.REUSE)
            return m.residual_output(x) if self.slot.is_last else x
        if plan.skip_trunk:
            m.count_module("trunk", Action.REUSE)
            return m.trunk_output(x) if self.slot.is_last else x
        if plan.is_full() and not m.stores_modules():
            out = self.slot.original(*args, **kwargs)
        elif (self.token_sparse and plan.actions[self.kind] == Action.REUSE
              and plan.actions[Kind.CROSS_ATTN] == Action.REUSE
              and plan.actions[Kind.MLP] in (Action.REUSE, Action.PARTIAL)):
            out = self._conservative(plan, **self._bind(args, kwargs))
        else:
            self.plan, self.x_in = plan, x
            try:
                out = self.slot.original(*args, **kwargs)
            finally:
                self.plan, self.x_in = None, None
        m.after_block(self.slot, out)
        return out

    def _bind(self, args, kwargs) -> dict:
        """The block's forward arguments by name (defaults filled in)."""
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    # ------------------------------------------------------------ the taps' work
    def run_module(self, attr: str, original, args, kwargs):
        """What a tapped submodule returns inside an armed block forward."""
        m, st = self.m, self.slot.state
        act = self.action(attr)
        kind = {"attn": self.kind, "cross_attn": Kind.CROSS_ATTN, "mlp": Kind.MLP}[attr]
        name = _TAPPED[attr]
        inp = args[0] if args else next(iter(kwargs.values()))
        m.count_module(kind, act)
        if act == Action.FULL:
            out = self._self_attn(original, args, kwargs) if attr == "attn" else \
                original(*args, **kwargs)
            self._store(name, out, kind)
            if attr != "attn":
                self._mark_full(kind)
            if attr == "mlp" and m.policy.scorer == Scorer.SIMILARITY and m.uses_selection(kind):
                st.put("x_ref", self.x_in)
            return out
        stored = self._stored(name, kind, inp.shape, inp.dtype)
        if act == Action.REUSE:
            return stored
        if attr == "attn":
            raise ValueError(f"self-attention cannot be recomputed on a token subset (plan for "
                             f"{kind} at step {m.step} is {act})")
        b, c = inp.shape[0], inp.shape[-1]
        idx = self._select(kind, self._ratio(kind))
        new = original(gather_tokens(inp.reshape(b, -1, c), idx), *args[1:], **kwargs)
        return self._overwrite(name, stored, idx, new, inp.dtype)

    def _overwrite(self, name: str, stored: torch.Tensor, idx: torch.Tensor, new: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
        """The reused (or forecast) value ``stored`` with the recomputed tokens ``new`` at
        ``idx``. Plain reuse writes them into the stored feature, so they persist until the next
        full step; a forecast is a fresh tensor and takes them for this step only."""
        m, feature = self.m, getattr(self.slot.state, name)
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
        m, st, block = self.m, self.slot.state, self.block
        scorer = m.policy.scorer if m.needs_scores() else None
        if scorer == Scorer.ATTENTION:
            block.attn.keep_attn_map = True
            try:
                out = original(*args, **kwargs)
            finally:
                block.attn.keep_attn_map = False
            amap, block.attn.last_attn_map = block.attn.last_attn_map, None
            st.put("score", sel.attention_received(amap, self.x_in.shape[0], self.temporal,
                                                   m.frames))
            return out
        if scorer == Scorer.VNORM:
            m.capturing = self.slot
            try:
                return original(*args, **kwargs)
            finally:
                m.capturing = None
        return original(*args, **kwargs)

    @property
    def temporal(self) -> bool:
        return self.kind == Kind.TEMPORAL_ATTN

    # ------------------------------------------------------------ stored features
    def _store(self, name: str, value: torch.Tensor, kind: Kind) -> None:
        if self.m.stores(kind):
            getattr(self.slot.state, name).update(value, self.m.at)

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

    def _stored(self, name: str, kind: Kind, shape, dtype: torch.dtype) -> torch.Tensor:
        """The stored (or forecast) feature ``name`` (it must have ``shape``) in ``dtype``."""
        feature = getattr(self.slot.state, name)
        if feature.shape is None or tuple(feature.shape) != tuple(shape):
            raise RuntimeError(f"block {self.slot.name}: the plan reuses {kind} at step "
                               f"{self.m.step} but nothing of shape {tuple(shape)} was stored "
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
            base = sel.random_scores(x_in.shape[0], grid, pol.seed, m.step, self.slot.index,
                                     x_in.device)
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
        m, st, block = self.m, self.slot.state, self.block
        b, n, c = x.shape
        _, _, g1, sh2, sc2, g2 = block_modulation(block.scale_shift_table, t, x_mask, t0)
        attn_shape = (b * S, T, c) if self.temporal else (b * T, S, c)
        A = self._attn_tokens(self._stored("attn", self.kind, attn_shape, x.dtype), b, T, S)
        CA = self._stored("cross", Kind.CROSS_ATTN, x.shape, x.dtype).view(b, T, S, c)
        xv = x.view(b, T, S, c)
        mlp_shape = st.mlp.shape if st.mlp.shape is not None and \
            math.prod(st.mlp.shape) == x.numel() else x.shape
        M = self._stored("mlp", Kind.MLP, mlp_shape, x.dtype)
        m.count_module(self.kind, Action.REUSE)
        m.count_module(Kind.CROSS_ATTN, Action.REUSE)
        m.count_module(Kind.MLP, plan.actions[Kind.MLP])
        if plan.actions[Kind.MLP] == Action.PARTIAL:
            self.x_in = x
            try:
                idx = self._select(Kind.MLP, self._ratio(Kind.MLP))
            finally:
                self.x_in = None
            tick = time.perf_counter()
            x2 = (gather_tokens(x, idx) + _gather_mod(g1, idx, S) * self._gather_attn(A, idx, S)
                  + gather_tokens(CA.reshape(b, n, c), idx))
            m.bookkeeping_s += time.perf_counter() - tick
            hs = block.norm2(x2) * (1 + _gather_mod(sc2, idx, S)) + _gather_mod(sh2, idx, S)
            M = self._overwrite("mlp", M, idx, block.mlp(hs), x.dtype)
        M = M.view(b, T, S, c)
        out = torch.addcmul(xv + CA, g1, A)
        out.addcmul_(g2, M)
        return out.view(b, n, c)

    def _attn_tokens(self, a: torch.Tensor, b: int, T: int, S: int) -> torch.Tensor:
        """Stored self-attention output (as the attention module returned it) as [B, T, S, C]
        (a view: temporal blocks keep [(B S), T, C])."""
        c = a.shape[-1]
        if self.temporal:
            return a.view(b, S, T, c).transpose(1, 2)
        return a.view(b, T, S, c)

    def _gather_attn(self, A: torch.Tensor, idx: torch.Tensor, S: int) -> torch.Tensor:
        b, T, _, c = A.shape
        if self.temporal:  # token t*S + s sits at s*T + t in the [(B S), T, C] layout
            native = A.transpose(1, 2).reshape(b, -1, c)  # a view of the stored tensor
            return gather_tokens(native, (idx % S) * T + idx // S)
        return gather_tokens(A.reshape(b, -1, c), idx)


def modulated_input(block, x, y=None, t=None, mask=None, x_mask=None, t0=None, T=None, S=None,
                    **_unused) -> torch.Tensor:
    """The block's normalised input modulated by the timestep (TeaCache's measured signal),
    [B, T*S, C], with the Open-Sora 1.2 modulation layout."""
    b, n, c = x.shape
    sh1, sc1 = block_modulation(block.scale_shift_table, t, x_mask, t0)[:2]
    return (block.norm1(x.view(b, T, S, c)) * (1 + sc1) + sh1).view(b, n, c)


class ModuleTap:
    """Instance-level ``forward`` of a block's ``attn`` / ``cross_attn`` / ``mlp``: the
    original forward unless the block's runner is armed (see :meth:`BlockRunner.run_module`)."""

    def __init__(self, runner: BlockRunner, attr: str, original):
        self.runner, self.attr, self.original = runner, attr, original

    def __call__(self, *args, **kwargs):
        if self.runner.plan is None:
            return self.original(*args, **kwargs)
        return self.runner.run_module(self.attr, self.original, args, kwargs)
