"""CacheManager: attaches a cache policy to an STDiT3-like model, tracks denoising steps and
keeps the stored features; ``apply_cache`` / ``remove_cache`` are the public entry points."""
from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .. import parallel as sp
from ..registry import CACHES, build_module, registered
from . import flops as fl
from . import selection as sel
from .plan import CROSS_ATTN, KINDS, MLP, PARTIAL, StepPlan
from .policies import CachePolicy, NoCache
from .runner import BlockRunner
from .state import BlockState, StoredBytes

_ATTR = "_duca_cache_manager"
_BLOCK_PARTS = ("norm1", "attn", "cross_attn", "norm2", "mlp", "scale_shift_table")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class BlockSlot:
    block: nn.Module
    name: str            # e.g. "spatial_blocks.3"
    index: int           # position in call order (0 .. 2*depth-1)
    layer: int           # depth index
    is_last: bool
    original: Callable
    state: BlockState
    capture: bool = False
    handles: List[Any] = field(default_factory=list)


def _check_model(model: nn.Module) -> None:
    for name in ("spatial_blocks", "temporal_blocks"):
        if not isinstance(getattr(model, name, None), nn.ModuleList):
            raise TypeError(f"apply_cache needs a model with '{name}' (an nn.ModuleList of "
                            f"STDiT3 blocks); {type(model).__name__} has none")
    if len(model.spatial_blocks) != len(model.temporal_blocks):
        raise TypeError("spatial_blocks and temporal_blocks must have the same length")
    for blocks in (model.spatial_blocks, model.temporal_blocks):
        for i, blk in enumerate(blocks):
            missing = [p for p in _BLOCK_PARTS if not hasattr(blk, p)]
            if missing:
                raise TypeError(f"block {i} ({type(blk).__name__}) lacks {missing}; apply_cache "
                                f"needs blocks with {list(_BLOCK_PARTS)}")


class CacheManager:
    """Owns the policy, the per-block stored features and the step counter of one model."""

    def __init__(self, model: nn.Module, policy: CachePolicy):
        _check_model(model)
        self.model = model
        self.policy = policy
        self.depth = len(model.spatial_blocks)
        self.stored_dtype = _DTYPES.get(getattr(policy, "stored_dtype", None))
        self.bytes = StoredBytes()
        self.slots: List[BlockSlot] = []
        self.plan: Optional[StepPlan] = None
        self.step = 0
        self.num_steps: Optional[int] = None
        self._session = False
        self._last_t: Optional[float] = None
        self._last_shape = None
        self._trunk: Optional[torch.Tensor] = None
        self._store_trunk = False
        self._grid: Optional[sel.TokenGrid] = None
        self._grid_key = None
        self._shape: Optional[fl.TrunkShape] = None
        self._handles: List[Any] = []
        self._validate_scorer()
        self._reset_stats()

    # ------------------------------------------------------------------ wiring
    def attach(self) -> "CacheManager":
        model = self.model
        order = []
        for i in range(self.depth):
            order.append((f"spatial_blocks.{i}", model.spatial_blocks[i], i))
            order.append((f"temporal_blocks.{i}", model.temporal_blocks[i], i))
        for k, (name, blk, layer) in enumerate(order):
            if "forward" in blk.__dict__:
                raise RuntimeError(f"{name} already has an instance-level forward (another cache "
                                   f"or patch is attached); remove it first")
            slot = BlockSlot(block=blk, name=name, index=k, layer=layer,
                             is_last=k == len(order) - 1, original=blk.forward,
                             state=BlockState(self.bytes))
            blk.forward = BlockRunner(self, slot)
            if getattr(self.policy, "scorer", None) == "vnorm":
                slot.handles.append(blk.attn.qkv.register_forward_hook(self._qkv_hook(slot)))
            self.slots.append(slot)
        self._handles.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._post_hook))
        setattr(model, _ATTR, self)
        return self

    def detach(self) -> None:
        self.reset()
        for slot in self.slots:
            slot.block.__dict__.pop("forward", None)
            for h in slot.handles:
                h.remove()
        for h in self._handles:
            h.remove()
        self.slots, self._handles = [], []
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)

    def _validate_scorer(self):
        if getattr(self.policy, "scorer", None) != "attention":
            return
        for blocks in (self.model.spatial_blocks, self.model.temporal_blocks):
            for blk in blocks:
                backend = getattr(blk.attn, "backend", None)
                if not hasattr(blk.attn, "keep_attn_map") or backend != "math":
                    raise ValueError(
                        f"cache scorer 'attention' needs attention maps, which only the 'math' "
                        f"attention backend returns; this model's self-attention uses "
                        f"{backend!r} (build the model with attn_backend='math', or choose "
                        f"scorer 'vnorm' / 'random', which work with fused attention)")

    def _qkv_hook(self, slot: BlockSlot):
        def hook(module, args, out):
            if slot.capture:
                blk = slot.block
                b = self._shape.batch
                score = sel.vnorm_from_qkv(out, b, blk.attn.num_heads, blk.temporal,
                                           self._shape.frames)
                slot.state.put("score", score)
        return hook

    # ------------------------------------------------------------------ runs
    def reset(self) -> None:
        """Forget every stored feature and start counting steps from 0."""
        for slot in self.slots:
            slot.state.clear()
        self._trunk = None
        self.bytes.swap(None, None)
        self.bytes.current = 0
        self.step = 0
        self.plan = None
        self._last_t = None
        self._last_shape = None
        if hasattr(self.policy, "reset"):
            self.policy.reset()

    @contextlib.contextmanager
    def session(self, num_steps: int):
        """One sampling run of ``num_steps`` model calls; features are freed at its end."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"session num_steps={num_steps!r}: must be an integer >= 1")
        self.policy.validate_run(num_steps)
        self.reset()
        self._reset_stats()
        self.num_steps, self._session = num_steps, True
        try:
            yield self
        finally:
            self.reset()
            self.num_steps, self._session = None, False

    def _pre_hook(self, model, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        ts = args[1] if len(args) > 1 else kwargs.get("timestep")
        t = float(torch.as_tensor(ts).reshape(-1)[0])
        shape = tuple(x.shape)
        new_run = (self._last_shape is not None and shape != self._last_shape)
        if not self._session:
            new_run = new_run or self._last_t is None or t >= self._last_t
        elif self.num_steps is not None and self.step >= self.num_steps:
            new_run = True
        if new_run:
            self.reset()
            self.runs += 1
        elif self._last_t is None:
            self.runs += 1
        self._last_t, self._last_shape = t, shape
        t0 = time.perf_counter()
        if self.num_steps is not None and self.step == 0:
            self.policy.validate_run(self.num_steps)
        plan = self.policy.plan(self.step, self.num_steps, t)
        if plan.skip_trunk and self._trunk is None:
            raise RuntimeError(f"policy {self.policy.name!r} skips the trunk at step {self.step} "
                               f"but no trunk output was computed before it in this run")
        self.plan = plan
        self._store_trunk = (self.policy.skips_trunk() and not plan.skip_trunk and
                             self.policy.plan(self.step + 1, self.num_steps, t).skip_trunk)
        y = args[2] if len(args) > 2 else kwargs.get("y")
        self._set_shapes(model, x, y)
        self.bookkeeping_s += time.perf_counter() - t0
        self.step_labels.append(plan.label)
        self._account_flops(plan)
        return None

    def _post_hook(self, model, args, out):
        self.step += 1
        self.plan = None
        if self.num_steps is not None and self.step >= self.num_steps:
            for slot in self.slots:  # the run is over: free everything
                slot.state.clear()
            self._trunk = None
            self.bytes.current = 0
        return None

    def _set_shapes(self, model, x, y):
        pt, ph, pw = getattr(model, "patch_size", (1, 2, 2))
        _, _, tx, hx, wx = x.shape
        T, H, W = -(-tx // pt), -(-hx // ph), -(-wx // pw)
        group = None
        if getattr(model, "enable_sequence_parallelism", False):
            getter = getattr(model, "sequence_parallel_group", None)
            group = getter() if callable(getter) else sp.get_sequence_parallel_group()
        self._grid_key = (T, H, W, sp.group_size(group), sp.group_rank(group))
        self._grid = None
        blk = self.slots[0].block
        self._shape = fl.TrunkShape(batch=x.shape[0], frames=T, spatial=H * W,
                                    hidden=blk.scale_shift_table.shape[-1], depth=self.depth,
                                    caption_len=int(y.shape[-2]) if y is not None else 0,
                                    mlp_hidden=blk.mlp.fc1.out_features)

    def grid_for(self, n_local: int) -> sel.TokenGrid:
        """Token grid of this rank for blocks that see ``n_local`` tokens per sample."""
        if self._grid is None or self._grid.local_tokens != n_local:
            T, H, W, p, r = self._grid_key
            s_local = n_local // T
            if s_local % W:
                raise RuntimeError(f"token selection needs whole latent rows per rank; this rank "
                                   f"holds {s_local} tokens per frame with row width {W}")
            rows = s_local // W
            self._grid = sel.TokenGrid(frames=T, rows=H, width=W, local_rows=rows,
                                       row_offset=r * rows)
        return self._grid

    # ----------------------------------------------------- runner callbacks
    def stores(self, kind: str) -> bool:
        return self.policy.reuses(kind)

    def uses_selection(self, kind: str) -> bool:
        return kind in (MLP, CROSS_ATTN) and getattr(self.policy, "scorer", None) is not None

    def storing_anything(self) -> bool:
        return self._store_trunk or any(self.policy.reuses(k) for k in KINDS)

    def needs_scores(self) -> bool:
        return getattr(self.policy, "scorer", None) in ("vnorm", "attention") and \
            (self.policy.reuses(MLP) or self.policy.reuses(CROSS_ATTN))

    def after_block(self, slot: BlockSlot, out: torch.Tensor) -> None:
        if slot.is_last and self._store_trunk:
            dt = self.stored_dtype
            old = self._trunk
            self._trunk = out if dt is None else out.to(dt)
            self.bytes.swap(old, self._trunk)

    def trunk_output(self, x: torch.Tensor) -> torch.Tensor:
        if self._trunk is None or self._trunk.shape != x.shape:
            raise RuntimeError("aggressive step: no stored trunk output of this shape")
        return self._trunk.to(x.dtype)

    # ------------------------------------------------------------------ stats
    def _reset_stats(self):
        self.runs = 0
        self.step_labels: List[str] = []
        self.module_counts: Dict[str, Dict[str, int]] = {}
        self.partial_tokens = 0
        self.flops_uncached = 0.0
        self.flops_actual = 0.0
        self.bookkeeping_s = 0.0
        self.bytes.peak = self.bytes.current

    def count_module(self, kind: str, action: str) -> None:
        d = self.module_counts.setdefault(kind, {})
        d[action] = d.get(action, 0) + 1

    def count_partial(self, k_local: int) -> None:
        self.partial_tokens += k_local

    def _account_flops(self, plan: StepPlan) -> None:
        shape = self._shape
        if shape is None:
            return
        T, H, W = self._grid_key[:3]
        grid = sel.TokenGrid(frames=T, rows=H, width=W, local_rows=H, row_offset=0)
        part = {k: sel.selected_per_sample(plan.ratios[k], grid)
                for k, a in plan.actions.items() if a == PARTIAL}
        self.flops_uncached += fl.full_step_flops(shape)
        self.flops_actual += fl.step_flops(shape, plan, part)

    def stats(self) -> dict:
        """Counts of the current/last session: steps by kind, module actions, FLOPs ratio
        (uncached / actual, analytic), peak stored bytes, bookkeeping seconds.

        ``bookkeeping_s`` is host time spent planning, selecting tokens and gathering /
        scattering them, measured with ``time.perf_counter`` and no device synchronisation: on
        a CPU it is the real cost, on CUDA it is the launch overhead only (use
        ``tools/benchmark.py`` for device time)."""
        by_kind: Dict[str, int] = {}
        for lab in self.step_labels:
            by_kind[lab] = by_kind.get(lab, 0) + 1
        return {
            "policy": self.policy.describe(),
            "steps": len(self.step_labels),
            "runs": self.runs,
            "steps_by_kind": by_kind,
            "step_labels": list(self.step_labels),
            "modules": {k: dict(v) for k, v in self.module_counts.items()},
            "partial_tokens": self.partial_tokens,
            "flops_uncached": self.flops_uncached,
            "flops_actual": self.flops_actual,
            "flops_ratio": (self.flops_uncached / self.flops_actual) if self.flops_actual else
            (float("inf") if self.flops_uncached else 1.0),
            "peak_stored_bytes": self.bytes.peak,
            "stored_bytes": self.bytes.current,
            "bookkeeping_s": self.bookkeeping_s,
        }

    def report(self) -> str:
        s = self.stats()
        kinds = ", ".join(f"{v} {k}" for k, v in s["steps_by_kind"].items())
        return "\n".join([
            f"cache policy   : {s['policy']['type']}",
            f"steps          : {s['steps']} ({kinds})",
            f"FLOPs ratio    : {s['flops_ratio']:.2f}x fewer than uncached (analytic, trunk matmuls)",
            f"peak cache mem : {s['peak_stored_bytes'] / 2**20:.1f} MiB",
            f"bookkeeping    : {s['bookkeeping_s'] * 1e3:.1f} ms (host time)",
        ])


def _init_keys(cls) -> set:
    """Keyword arguments ``cls(...)`` accepts: its ``__init__`` parameters and, where that
    forwards ``**kwargs``, those of the base classes it forwards to."""
    keys = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        keys |= {p.name for p in params if p.name != "self"
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return keys


def build_policy(cfg: Any) -> CachePolicy:
    """A policy object from ``dict(type=...)`` (validated), a policy object, or None -> none."""
    if cfg is None:
        return NoCache()
    if isinstance(cfg, CachePolicy):
        return cfg
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ValueError(f"cache config {cfg!r} must be a dict with a 'type' key; registered "
                         f"policies: {registered(CACHES)}")
    typ = cfg["type"]
    names = registered(CACHES)
    if typ not in names:
        raise KeyError(f"unknown cache policy type {typ!r}; registered policies: {names}")
    accepted = _init_keys(CACHES.get(typ))
    for k in cfg:
        if k != "type" and k not in accepted:
            raise ValueError(f"cache policy {typ!r}: unknown key {k!r}={cfg[k]!r}; "
                             f"accepted keys: {sorted(accepted)}")
    return build_module(cfg, CACHES)


def apply_cache(model: nn.Module, cfg: Any = None) -> CacheManager:
    """Attach a cache policy (``dict(type=...)`` or a policy object) to ``model`` and return its
    manager. The model's blocks are patched per instance; :func:`remove_cache` undoes it."""
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError("this model already has a cache attached; call remove_cache(model) "
                           "first")
    return CacheManager(model, build_policy(cfg)).attach()


def remove_cache(model: nn.Module) -> None:
    """Detach the cache from ``model``, restoring it exactly (no-op when none is attached)."""
    mgr = getattr(model, _ATTR, None)
    if mgr is not None:
        mgr.detach()


def get_cache_manager(model: nn.Module) -> Optional[CacheManager]:
    return getattr(model, _ATTR, None)
