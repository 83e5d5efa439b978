"""The cache-aware block forward. It calls the block's own submodules (``norm1``, ``attn``,
``cross_attn``, ``norm2``, ``mlp``, ``drop_path``, ``scale_shift_table``) and only decides,
per module, whether to compute, reuse, or recompute a token subset; attention backends,
sequence-parallel attention classes and checkpoint weights stay untouched.

A conservative step (self- and cross-attention reused, MLP on a token subset) is token-sparse:
the selected tokens are gathered first, only their trajectory is computed, and every token
then takes x + g1 * A + CA + g2 * M in two fused passes.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..models.layers import modulate
from ..models.stdit3 import block_modulation, run_self_attn
from . import selection as sel
from .plan import CROSS_ATTN, FULL, MLP, PARTIAL, REUSE, SPATIAL_ATTN, TEMPORAL_ATTN

if TYPE_CHECKING:  # pragma: no cover
    from .manager import BlockSlot, CacheManager


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, C] at idx [B, k] -> [B, k, C]."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _gather_mod(m: torch.Tensor, idx: torch.Tensor, s_local: int) -> torch.Tensor:
    """Modulation [B, T|1, 1, C] at the frames of tokens idx [B, k] -> [B, k|1, C]."""
    if m.shape[1] == 1:
        return m[:, 0]
    return _gather(m[:, :, 0], idx // s_local)


class BlockRunner:
    def __init__(self, manager: "CacheManager", slot: "BlockSlot"):
        self.m = manager
        self.slot = slot

    # ------------------------------------------------------------ scoring
    def _select(self, kind: str, ratio: float, x_in: torch.Tensor, step: int) -> torch.Tensor:
        m, st, pol = self.m, self.slot.state, self.m.policy
        t0 = time.perf_counter()
        grid = m.grid_for(x_in.shape[1])
        b = x_in.shape[0]
        scorer = pol.scorer
        if scorer in ("vnorm", "attention"):
            if st.score is None:
                raise RuntimeError(f"{scorer} scores of block {self.slot.name} are missing: a "
                                   f"token-subset step needs a fully computed self-attention "
                                   f"before it in the same run")
            base = st.score
        elif scorer == "random":
            base = sel.random_scores(b, grid, pol.seed, step, self.slot.index, x_in.device)
        elif scorer == "similarity":
            if st.x_ref is None:
                raise RuntimeError(f"similarity scores of block {self.slot.name} need a fully "
                                   f"computed MLP step before the token-subset step")
            base = 1 - torch.nn.functional.cosine_similarity(x_in.float(), st.x_ref.float(), dim=-1)
        else:  # norm: feature norm of the block input
            base = x_in.float().norm(dim=-1)
        score = sel.normalise_rows(base, grid)
        last = st.last_step.get(kind)
        if pol.staleness_bonus and last is not None:
            score = score + pol.staleness_bonus * (step - last).float() / 3.0
        idx = sel.select_tokens(score, ratio, grid, pol.cfg_shared_selection)
        if last is not None:
            last.scatter_(1, idx, step)
        m.count_partial(idx.shape[1])
        m.bookkeeping_s += time.perf_counter() - t0
        return idx

    def _ratio(self, plan, kind: str) -> float:
        r = plan.ratios[kind]
        sched = getattr(self.m.policy, "ratio_schedule", None)
        if sched is not None and sched.per_layer:
            r = min(1.0, r * sched.factor(self.m.step, self.m.num_steps, self.slot.layer,
                                          self.m.depth))
        return r

    def _store(self, name: str, value: torch.Tensor, kind: str) -> None:
        if self.m.stores(kind):  # contiguous: later steps gather from it and scatter into it
            dt = self.m.stored_dtype
            value = value if dt is None or value.dtype == dt else value.to(dt)
            self.slot.state.put(name, value.contiguous())

    def _mark_full(self, kind: str, x_in: torch.Tensor) -> None:
        if self.m.stores(kind) and self.m.uses_selection(kind):
            st = self.slot.state
            last = st.last_step.get(kind)
            if last is None or last.shape != x_in.shape[:2]:
                st.last_step[kind] = torch.full(x_in.shape[:2], self.m.step, dtype=torch.long,
                                                device=x_in.device)
            else:
                last.fill_(self.m.step)

    def _stored(self, name: str, kind: str, like: torch.Tensor) -> torch.Tensor:
        v = getattr(self.slot.state, name)
        if v is None or v.shape != like.shape:
            raise RuntimeError(f"block {self.slot.name}: the plan reuses {kind} at step "
                               f"{self.m.step} but nothing matching {tuple(like.shape)} was "
                               f"stored (policy {self.m.policy.name!r})")
        return v if v.dtype == like.dtype else v.to(like.dtype)

    def _self_attn(self, block, h: torch.Tensor) -> torch.Tensor:
        """Full self-attention; captures this block's token scores when a selection needs them."""
        m, st = self.m, self.slot.state
        want = m.needs_scores()
        scorer = m.policy.scorer
        if want and scorer == "attention":
            block.attn.keep_attn_map = True
            try:
                out = run_self_attn(block, h)
            finally:
                block.attn.keep_attn_map = False
            amap, block.attn.last_attn_map = block.attn.last_attn_map, None
            b, t = h.shape[:2]
            st.put("score", sel.attention_received(amap, b, block.temporal, t))
            return out
        if want and scorer == "vnorm":
            self.slot.capture = True
            try:
                return run_self_attn(block, h)
            finally:
                self.slot.capture = False
        return run_self_attn(block, h)

    # ------------------------------------------------------------ forward
    def __call__(self, x, y, t, mask=None, x_mask=None, t0=None, T=None, S=None):
        m = self.m
        plan = m.plan
        block = self.slot.block
        if plan is None:  # not inside a tracked model call: behave as the original block
            return self.slot.original(x, y, t, mask, x_mask, t0, T, S)
        if plan.skip_trunk:
            m.count_module("trunk", REUSE)
            return m.trunk_output(x) if self.slot.is_last else x
        if plan.is_full() and not m.storing_anything():
            out = self.slot.original(x, y, t, mask, x_mask, t0, T, S)
            m.after_block(self.slot, out)
            return out

        attn_kind = TEMPORAL_ATTN if block.temporal else SPATIAL_ATTN
        a_act, c_act, m_act = plan.actions[attn_kind], plan.actions[CROSS_ATTN], plan.actions[MLP]
        b, n, c = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = block_modulation(block.scale_shift_table, t, x_mask, t0)
        xv = x.view(b, T, S, c)
        st = self.slot.state

        if a_act == REUSE and c_act == REUSE and m_act in (REUSE, PARTIAL):
            out = self._conservative(block, x, xv, (g1, sh2, sc2, g2), m_act, plan, T, S)
            m.after_block(self.slot, out)
            return out

        # ---- general path, op order identical to the block's own forward
        if a_act == FULL:
            h = self._self_attn(block, modulate(block.norm1(xv), sh1, sc1))
            self._store("attn", h, attn_kind)
        elif a_act == REUSE:
            h = self._stored("attn", attn_kind, xv)
        else:
            raise ValueError(f"self-attention cannot be recomputed on a token subset "
                             f"(plan for {attn_kind} at step {m.step} is {a_act!r})")
        m.count_module(attn_kind, a_act)
        xv = xv + block.drop_path(g1 * h)

        if c_act == FULL:
            ca = block.cross_attn(xv.reshape(b, n, c), y, mask).view(b, T, S, c)
            self._store("cross", ca, CROSS_ATTN)
            self._mark_full(CROSS_ATTN, x)
        else:
            ca = self._stored("cross", CROSS_ATTN, xv)
            if c_act == PARTIAL:
                idx = self._select(CROSS_ATTN, self._ratio(plan, CROSS_ATTN), x, m.step)
                self._scatter(st.cross, idx,
                              block.cross_attn(_gather(xv.reshape(b, n, c), idx), y, mask))
                ca = self._stored("cross", CROSS_ATTN, xv)
        m.count_module(CROSS_ATTN, c_act)
        xv = xv + ca

        if m_act == FULL:
            mo = block.mlp(modulate(block.norm2(xv), sh2, sc2))
            self._store("mlp", mo, MLP)
            self._mark_full(MLP, x)
            if m.policy.scorer == "similarity" and m.uses_selection(MLP):
                st.put("x_ref", x)
        else:
            mo = self._stored("mlp", MLP, xv)
            if m_act == PARTIAL:
                idx = self._select(MLP, self._ratio(plan, MLP), x, m.step)
                xs = _gather(xv.reshape(b, n, c), idx)
                hs = modulate(block.norm2(xs), _gather_mod(sh2, idx, S), _gather_mod(sc2, idx, S))
                self._scatter(st.mlp, idx, block.mlp(hs))
                mo = self._stored("mlp", MLP, xv)
        m.count_module(MLP, m_act)
        xv = xv + block.drop_path(g2 * mo)
        out = xv.reshape(b, n, c)
        m.after_block(self.slot, out)
        return out

    @staticmethod
    def _scatter(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
        b, n, c = dst.shape[0], idx.shape[1], dst.shape[-1]
        dst.view(b, -1, c).scatter_(1, idx[..., None].expand(-1, -1, c), src.to(dst.dtype))

    def _conservative(self, block, x, xv, mods, m_act, plan, T, S):
        """Token-sparse step: attention outputs reused, MLP on the selected tokens only."""
        g1, sh2, sc2, g2 = mods
        m, st = self.m, self.slot.state
        attn_kind = TEMPORAL_ATTN if block.temporal else SPATIAL_ATTN
        A = self._stored("attn", attn_kind, xv)
        CA = self._stored("cross", CROSS_ATTN, xv)
        M = self._stored("mlp", MLP, xv)
        b, n, c = x.shape
        if m_act == PARTIAL:
            idx = self._select(MLP, self._ratio(plan, MLP), x, m.step)
            t_start = time.perf_counter()
            ex = idx[..., None].expand(-1, -1, c)
            gi = (lambda v: v.reshape(b, n, c).gather(1, ex))
            x2 = gi(xv) + _gather_mod(g1, idx, S) * gi(A) + gi(CA)
            m.bookkeeping_s += time.perf_counter() - t_start
            hs = modulate(block.norm2(x2), _gather_mod(sh2, idx, S), _gather_mod(sc2, idx, S))
            new = block.mlp(hs)
            t_start = time.perf_counter()
            self._scatter(st.mlp, idx, new)
            M = self._stored("mlp", MLP, xv)
            m.bookkeeping_s += time.perf_counter() - t_start
        m.count_module(attn_kind, REUSE)
        m.count_module(CROSS_ATTN, REUSE)
        m.count_module(MLP, m_act)
        out = torch.addcmul(xv + CA, g1, A)
        out.addcmul_(g2, M)
        return out.view(b, n, c)
