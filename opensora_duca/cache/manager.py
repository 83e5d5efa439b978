"""CacheManager: attaches a cache policy to a model of a known family (its layout adapter),
gives the block runners each step's context and keeps the stored features; ``apply_cache`` /
``remove_cache`` are the entry points. Elsewhere: run boundaries (:mod:`.runs`), counts and
reports (:mod:`.stats`), adaptive run state (:mod:`.adaptive`), the block layout
(:mod:`.layouts`), per-block orchestration (:mod:`.runner`).

Ownership: the model holds its manager (an attribute) and its blocks hold their runners
(instance-level ``forward``); every pointer back — runner to manager and to its block, taps to
runners, manager to model, hooks to manager — is a weak reference, so dropping the model frees
the blocks and the stored features without the cyclic garbage collector.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import threading
import time
import weakref
from typing import Any, List, Optional, Sequence

import torch
import torch.nn as nn

from .. import parallel as sp
from ..utils.compile import check_available, compile_options
from . import selection as sel
from .adaptive import AdaptiveRun, check_cfg_halves, group_rows, relative_l1
from .calibrate import check_calibration_model
from .layouts import layout_for, tapped_modules
from .plan import Action, Kind, StepKind, StepPlan
from .policies import AdaptivePolicy, CachePolicy, Scorer, build_policy
from .runner import BlockRunner, BlockSlot, ModuleTap, Regions
from .runs import RunTracker, check_grad, host_timesteps
from .state import BlockState, Codec, Feature, StoredBytes
from .stats import CacheStats, format_report

_ATTR = "_duca_cache_manager"


def _weak_method(method):
    """A callable that calls ``method`` through a weak reference to its object."""
    ref = weakref.WeakMethod(method)

    def call(*args, **kwargs):
        fn = ref()
        return None if fn is None else fn(*args, **kwargs)
    return call


class CacheManager:
    """Owns the policy, the per-block stored features and the step context of one model."""

    def __init__(self, model: nn.Module, policy: CachePolicy):
        self.layout = layout_for(model)
        self._model = weakref.ref(model)
        self.policy = policy
        self.regions = Regions(None, self.layout.REGIONS)
        self.depth = self.layout.depth
        self.codec = Codec(policy.stored_dtype)
        self.order, self.distance = policy.forecast_order, policy.forecast_distance
        self.bytes = StoredBytes()
        self.counts = CacheStats(self.bytes)
        self.run = RunTracker(model.forward, self.layout)
        # one sampling run at a time: the thread inside a session or a model call owns the
        # run state; a call from another thread meanwhile is refused (never mixed in)
        self._owner_lock = threading.Lock()
        self._owner: Optional[int] = None
        self._owner_depth = 0
        self._call = threading.local()  # whether this thread's model call holds a claim
        self.slots: List[BlockSlot] = []
        self.plan: Optional[StepPlan] = None
        # (part, parts): this process holds part ``part`` of ``parts`` equal slices of the CFG
        # batch (CFG parallelism: (cfg_rank, 2)); per-batch random draws follow the whole batch
        self.batch_part = (0, 1)
        self.log_runs = False  # the wrapper sets it: each finished run logs its report
        self._at_exit = None
        self.method = (policy.forecast_method, policy.forecast_corrector)
        self._trunk = Feature(self.codec, self.bytes, self.order, *self.method)
        self._store_trunk = False
        self.adaptive = AdaptiveRun(Feature(self.codec, self.bytes))
        self._adaptive = isinstance(policy, AdaptivePolicy)
        # VerifiedDuCa: its conservative steps check the forecast per clip (decision groups)
        self._verifies = bool(getattr(policy, "verifies_tokens", False))
        self._fallback: Optional[List[bool]] = None  # per group: next aggressive step computes
        self.check_pending = False
        self._verify_counts = [0, 0]  # checks, failed checks
        self.group = None  # the sequence-parallel group of the current call
        self.shape = None  # the trunk's shape of the current call (flops.TrunkShape)
        self._grid: Optional[sel.TokenGrid] = None
        self._grid_key = None
        self._handles: List[Any] = []
        self._stores = {k: policy.reuses(k) for k in Kind}
        self._validate_scorer(model)

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:  # pragma: no cover
            raise RuntimeError("the model of this cache manager no longer exists")
        return model

    step = property(lambda self: self.run.step)
    num_steps = property(lambda self: self.run.num_steps)
    runs = property(lambda self: self.counts.runs)

    # ------------------------------------------------------------------ wiring
    def attach(self) -> "CacheManager":
        model, lay = self.model, self.layout
        order = lay.blocks(model)
        tap = self.stores_modules()
        recorders = getattr(lay, "RECORDERS", {})
        for k, (name, blk, layer) in enumerate(order):
            tapped = tapped_modules(lay, blk)
            mods = [(name, blk), (f"{name}.qkv", lay.qkv_module(blk))] + \
                [(f"{name}.{a}", blk.get_submodule(a)) for a in tapped]
            patched = [n for n, mod in mods if "forward" in mod.__dict__]
            if patched:
                raise RuntimeError(f"{patched[0]} already has an instance-level forward "
                                   f"(another cache or patch is attached); remove it first")
            slot = BlockSlot(block_ref=weakref.ref(blk), name=name, index=k, layer=layer,
                             is_last=k == len(order) - 1,
                             state=BlockState(self.bytes, self.codec, self.order,
                                              *self.method))
            runner = BlockRunner(self, slot)
            blk.forward = runner
            if tap:
                for attr in tapped:
                    runner.taps[attr] = ModuleTap(runner, attr)
                    if attr in recorders:
                        runner.taps[attr].recorder, runner.taps[attr].parts = recorders[attr]
                    runner.taps[attr].install(blk.get_submodule(attr))
            if self.policy.scorer == Scorer.VNORM and self.needs_scores():
                runner.qkv_tap = ModuleTap(None, "qkv")  # records the qkv output for scores
                runner.qkv_tap.install(lay.qkv_module(blk))
            where = lay.map_module(blk)
            if self.policy.scorer == Scorer.ATTENTION and self.needs_scores() and where:
                runner.map_tap = ModuleTap(None, "map")  # records the map where it passes
                runner.map_tap.install(where)
            self.slots.append(slot)
        self._handles.append(model.register_forward_pre_hook(_weak_method(self._pre_hook),
                                                             with_kwargs=True))
        self._handles.append(model.register_forward_hook(_weak_method(self._post_hook),
                                                         always_call=True))
        setattr(model, _ATTR, self)
        return self

    def set_compile(self, cfg: Any) -> None:
        """Run the per-block work compiled with torch.compile (``cfg``: None | True |
        ``dict(mode=..., backend=..., fullgraph=...)``, see :mod:`opensora_duca.utils.compile`)
        or, with None, eagerly. Token selection, the step plan and stored features stay in
        eager Python, so compiling changes neither."""
        opts = compile_options(cfg)
        if opts is not None:
            param = next(self.model.parameters(), None)
            check_available(opts, param.device if param is not None else torch.device("cpu"))
        self.regions = Regions(opts, self.layout.REGIONS)

    def detach(self) -> None:
        self.reset()
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None
        for slot in self.slots:
            blk = slot.block
            if blk is None:
                continue
            blk.__dict__.pop("forward", None)
            for mod in [self.layout.qkv_module(blk), self.layout.map_module(blk)] + \
                    [blk.get_submodule(a) for a in tapped_modules(self.layout, blk)]:
                if mod is not None:
                    ModuleTap.remove(mod)
        for h in self._handles:
            h.remove()
        self.slots, self._handles = [], []
        model = self._model()
        if model is not None and getattr(model, _ATTR, None) is self:
            delattr(model, _ATTR)

    def _validate_scorer(self, model):
        """Scorer 'attention' needs attention maps from every block's self-attention."""
        if self.policy.scorer == Scorer.ATTENTION:
            for _, blk, _ in self.layout.blocks(model):
                self.layout.check_maps(blk)

    # ------------------------------------------------------------------ runs
    def reset(self) -> None:
        """Forget every stored feature and start counting steps from 0 (the open run, if any,
        is finished: its report is logged where :attr:`log_runs` is set)."""
        self.counts.finish_run(self.policy.name, self.storing_anything(), self.log_runs)
        self._free()
        self.plan = None
        self.run.clear()

    def _free(self) -> None:
        for slot in self.slots:
            slot.state.clear()
        self._trunk.clear()
        self.adaptive.clear()
        self._fallback = None
        self.check_pending = False

    @contextlib.contextmanager
    def session(self, num_steps: int, timesteps: Optional[Sequence[float]] = None):
        """One sampling run of ``num_steps`` model calls; features are freed at its end.

        ``timesteps`` (optional): the run's ``num_steps`` timesteps as the sampler knows them
        on the host (a list or a CPU tensor). Given, step ``i`` takes ``timesteps[i]`` and the
        model's ``timestep`` argument is never read back from the device, so a run with a fixed
        plan makes no host-device synchronisation."""
        ts = host_timesteps(num_steps, timesteps)
        self.policy.validate_run(num_steps)
        self._claim("a cache session")
        try:
            if self.run.in_session:
                raise RuntimeError("cache session: a session is already open on this model "
                                   "(nested session() calls); each sampling run takes one "
                                   "session, opened once, around all of its model calls")
            self.reset()
            self.run.open_session(num_steps, ts)
            try:
                yield self
            finally:
                self.reset()
                self.run.close_session()
        finally:
            self._release()

    def _claim(self, what: str) -> None:
        """This thread takes the run state (re-entrant in one thread); another thread's
        session or model call in progress is a clear error."""
        me = threading.get_ident()
        with self._owner_lock:
            if self._owner is not None and self._owner != me:
                raise RuntimeError(
                    f"{what} from a second thread while another thread is running a sampling "
                    f"run on this cached model: the cache holds one run's stored features, so "
                    f"concurrent runs would mix them. Use one model (and cache) per thread, or "
                    f"serialise the runs (a lock around generate)")
            self._owner = me
            self._owner_depth += 1

    def _release(self) -> None:
        with self._owner_lock:
            self._owner_depth = max(self._owner_depth - 1, 0)
            if self._owner_depth == 0:
                self._owner = None

    def _pre_hook(self, model, args, kwargs):
        check_grad(model, self.policy.name, self.storing_anything(), args, kwargs)
        self._claim("a model call")
        self._call.claimed = True  # released by the post hook, which runs always
        self.plan = None
        return self._begin_call(model, args, kwargs)

    def _begin_call(self, model, args, kwargs):
        x, y, t, new_run = self.run.begin(args, kwargs)
        if new_run:
            self.reset()
        if self.run.record(x, y, t, args, kwargs):  # a run's first step
            self._open_run(x)
        elif (self._adaptive or self._verifies) and self.run.step == 1:
            self.adaptive.refine(x)  # clips from one noise part here
            self._fallback = None
        tick = time.perf_counter()
        step, num_steps, timesteps = self.run.step, self.run.num_steps, self.run.timesteps
        if num_steps is not None and step == 0:
            self.policy.validate_run(num_steps)
        plan = self.policy.plan(step, num_steps, timesteps)
        if plan.decide_at and not self.layout.paired:  # block pairs are single blocks here
            plan = dataclasses.replace(plan, decide_at=plan.decide_at // 2)
        if plan.skip_trunk and self._trunk.shape is None:
            raise RuntimeError(f"policy {self.policy.name!r} skips the trunk at step {step} "
                               f"but no trunk output was computed before it in this run")
        if self._verifies:
            plan = self._verified_plan(plan, x.device)
        self.plan = plan
        # the trunk output is kept for the next step's skip, or, when forecasting, at every
        # step that computes it (the anchors of its differences; VerifiedDuCa: the steps that
        # compute every module but cross-attention)
        if self._verifies:
            self._store_trunk = _anchor_step(plan) and self.policy.skips_trunk()
        else:
            self._store_trunk = not plan.skip_trunk and (
                (self.order > 0 and self.policy.skips_trunk()) or
                self.policy.skips_trunk_at(step + 1, num_steps, timesteps + [t]))
        self.shape, grid = self.layout.trunk_shape(
            model, x, y, self.slots[0].block, lambda name: self.run.arg(args, kwargs, name))
        self.group = self.layout.sequence_parallel_group(model)
        if step == 0 and hasattr(self.layout, "check_group"):
            self.layout.check_group(model, sp.group_size(self.group),
                                    self.uses_selection(Kind.MLP) and self._picks_tokens(),
                                    self._adaptive, self.policy.name)
        self._grid_key = (*grid, sp.group_size(self.group), sp.group_rank(self.group))
        self._grid = None
        self.counts.bookkeeping_s += time.perf_counter() - tick
        return None

    def _open_run(self, x: torch.Tensor) -> None:
        self.counts.open_run(self.run.note)
        self.run.note = None
        if self._adaptive or self._verifies:
            self.adaptive.start(x)
        if self.policy.cfg_shared_selection:
            check_cfg_halves(x)
        if self.log_runs and self._at_exit is None:  # the last run of the process, too
            ref = weakref.ref(self)
            self._at_exit = lambda: ref() is not None and ref().reset()
            atexit.register(self._at_exit)

    def _post_hook(self, model, args, out):
        try:
            if out is None:  # the forward raised (the hook runs always): the step is void
                self.plan = None
                return None
            if self.plan is not None:  # the step's final plan (adaptive: decided mid-step)
                self.counts.count_step(self.plan, self.shape, self._grid_key, self.layout)
            self.run.end(out)
            self.plan = None
            if self.run.done:  # the run is over: free everything
                self._free()
            return None
        finally:
            self.group = None  # hold no process group between calls (set again next call)
            if getattr(self._call, "claimed", False):
                self._call.claimed = False
                self._release()

    def grid_for(self, n_local: int) -> sel.TokenGrid:
        """Token grid of this rank for blocks that see ``n_local`` tokens per sample."""
        if self._grid is None or self._grid.local_tokens != n_local:
            self._grid = sel.local_grid(self._grid_key, n_local)
        return self._grid

    # ----------------------------------------------------- the runners' context
    def stores(self, kind: Kind) -> bool:
        return self._stores[kind]

    def uses_selection(self, kind: Kind) -> bool:
        return kind in self.layout.FULL_CALL_KINDS and self.policy.scorer is not None

    def storing_anything(self) -> bool:
        return self.policy.skips_trunk() or self.stores_modules()

    def _picks_tokens(self) -> bool:
        """Whether some step of the policy recomputes a token subset (a partial module)."""
        fn = getattr(self.policy, "fresh_ratio", None)
        return self.stores(Kind.MLP) and (fn is None or fn > 0)

    def stores_modules(self) -> bool:
        return any(self._stores.values())

    def needs_scores(self) -> bool:
        return self.policy.scorer in (Scorer.VNORM, Scorer.ATTENTION) and \
            (self._stores[Kind.MLP] or self._stores[Kind.CROSS_ATTN])

    def after_block(self, slot: BlockSlot, out: torch.Tensor) -> None:
        if slot.is_last and self._store_trunk:
            self._trunk.update(out, self.at)
        if slot.is_last:
            self.adaptive.after_last_block(out, self.at)

    def decide(self, slot: BlockSlot, x: torch.Tensor, bound: dict, state=None) -> StepPlan:
        """At block ``plan.decide_at``: every decision group's change is measured and the
        policy decides per group (:meth:`AdaptiveRun.decide`); this sets the step's plan.
        ``state``: the trunk's hidden state at that block, in the form its last block returns
        (default ``x``)."""
        rows = self.adaptive.decide(
            self.policy, self.layout, slot.block, x, bound, self.step, self.num_steps,
            self.grid_for(x.shape[1]), self.group, self.counts, state, at=self.at)
        if rows is None:
            self.plan = StepPlan(label=self.plan.label)
        else:
            self.plan = StepPlan(residual_from=slot.index, computed_rows=rows,
                                 label=StepKind.MIXED if rows else StepKind.RESIDUAL)
        return self.plan

    # ------------------------------------------------------------ VerifiedDuCa
    def _verified_plan(self, plan: StepPlan, device: torch.device) -> StepPlan:
        """A computed step clears every clip's fallback; a conservative step arms the check;
        an aggressive step computes the trunk for the clips whose last check failed."""
        self.check_pending = False
        groups = self.adaptive.groups
        if self._fallback is None or len(self._fallback) != len(groups):
            self._fallback = [False] * len(groups)
        if _anchor_step(plan):
            self._fallback = [False] * len(groups)
        elif self.policy.is_aggressive(plan):
            flags = self._fallback
            self.counts.group_labels.append(
                [str(StepKind.REJECTED if f else StepKind.AGGRESSIVE) for f in flags])
            rows = group_rows(groups, flags)
            if rows:  # trunk: the others pass the blocks by; modules: the others forecast
                self.adaptive.rows = torch.tensor(rows, device=device)
                self.adaptive.sub = None
                return StepPlan(actions=plan.actions, computed_rows=tuple(rows),
                                residual_from=0 if plan.skip_trunk else None,
                                others_from_trunk=plan.skip_trunk,
                                label=StepKind.AGGRESSIVE_MIXED)
        elif any(a == Action.PARTIAL for a in plan.actions.values()):
            # without a threshold nothing would read the check: it is not computed
            self.check_pending = self.policy.verify_threshold is not None
        return plan

    def check_forecast(self, forecast: torch.Tensor, idx: torch.Tensor,
                       exact: torch.Tensor) -> None:
        """VerifiedDuCa, at the step's first token-subset module: each clip's relative L1 error
        of the forecast [B, N, C] at the recomputed tokens idx [B, k] against their exact values
        [B, k, C] (per-row float64 sums, one all_gather); sets the clips' fallback flags."""
        if not self.check_pending:
            return
        self.check_pending = False
        t0 = time.perf_counter()
        b, c = forecast.shape[0], forecast.shape[-1]
        fc = forecast.reshape(b, -1, c)
        grid = self.grid_for(fc.shape[1])
        at = idx[..., None].expand(-1, -1, c)
        now = torch.zeros_like(fc).scatter_(1, at, fc.gather(1, at))
        ref = torch.zeros_like(fc).scatter_(1, at, exact.reshape(b, -1, c).to(fc.dtype))
        groups = self.adaptive.groups
        errors = relative_l1(now, ref, grid, self.group, groups)
        thr = self.policy.verify_threshold
        failed = [e >= thr for e in errors]
        self._fallback = failed
        self._verify_counts[0] += len(errors)
        self._verify_counts[1] += sum(failed)
        self.counts.changes.append(list(errors))
        self.counts.group_labels.append(
            [str(StepKind.CHECK_FAILED if f else StepKind.CHECK_PASSED) for f in failed])
        self.counts.bookkeeping_s += time.perf_counter() - t0

    def trunk_output(self, x: torch.Tensor) -> torch.Tensor:
        if self._trunk.shape is None or tuple(self._trunk.shape) != tuple(x.shape):
            raise RuntimeError("aggressive step: no stored trunk output of this shape")
        return self._trunk.value(self.at, x.dtype)

    @property
    def at(self) -> float:
        """Where the current step sits for forecasting: its index, or its timestep."""
        return float(self.step) if self.distance == "step" else self.run.timesteps[-1]

    # ------------------------------------------------------------------ stats
    def reset_stats(self) -> None:
        """Start the counts of :meth:`stats` again (stored features are kept)."""
        self.counts.reset()
        self._verify_counts = [0, 0]

    def stats(self) -> dict:
        """Counts since the cache was attached (or :meth:`reset_stats`), summed over every run
        and session (:meth:`.stats.CacheStats.as_dict` says what each entry holds)."""
        out = self.counts.as_dict(self.policy.describe(), self.adaptive.groups)
        if getattr(self.policy, "verifies", False):  # how often a checked forecast failed
            labels = [lab for step in out["group_labels"] for lab in step]
            checked = sum(lab in (StepKind.VERIFIED, StepKind.REJECTED) for lab in labels)
            failed = sum(lab == StepKind.REJECTED for lab in labels)
            out["verify"] = dict(checked=checked, failed=failed,
                                 fail_rate=failed / checked if checked else None)
        if self._verifies:  # checks at conservative steps, fallbacks at aggressive ones
            checked, failed = self._verify_counts
            labels = [lab for step in out["group_labels"] for lab in step]
            out["verify"] = dict(checked=checked, failed=failed,
                                 fail_rate=failed / checked if checked else None,
                                 fallback_steps=sum(lab == StepKind.REJECTED for lab in labels))
        return out

    def run_summary(self) -> Optional[dict]:
        """The open run's counts (policy, steps by kind, FLOPs ratio, peak stored bytes, and
        why no step could be cached, when none was), None between runs."""
        return self.counts.run_summary(self.policy.name, self.storing_anything())

    def report(self) -> str:
        return format_report(self.stats())


def _anchor_step(plan: StepPlan) -> bool:
    """A step that computes the trunk with every module but cross-attention computed."""
    return (not plan.skip_trunk and plan.residual_from is None
            and all(plan.actions[k] == Action.FULL
                    for k in (Kind.SPATIAL_ATTN, Kind.TEMPORAL_ATTN, Kind.MLP)))


def apply_cache(model: nn.Module, cfg: Any = None, compile: Any = None) -> CacheManager:
    """Attach a cache policy (``dict(type=...)`` or a policy object) to ``model`` and return its
    manager. The model's blocks are patched per instance; :func:`remove_cache` undoes it.

    ``compile`` (see :meth:`CacheManager.set_compile`) runs the per-block work compiled with
    torch.compile; with policy ``none`` that is the compiled uncached model."""
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError("this model already has a cache attached; call remove_cache(model) "
                           "first")
    policy = build_policy(cfg)
    check_calibration_model(policy, model)  # a calibration file fitted on another model
    mgr = CacheManager(model, policy)
    mgr.set_compile(compile)
    return mgr.attach()


def remove_cache(model: nn.Module) -> None:
    """Detach the cache from ``model``, restoring it exactly (no-op when none is attached)."""
    mgr = getattr(model, _ATTR, None)
    if mgr is not None:
        mgr.detach()


def get_cache_manager(model: nn.Module) -> Optional[CacheManager]:
    return getattr(model, _ATTR, None)
