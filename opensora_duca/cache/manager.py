"""CacheManager: attaches a cache policy to an STDiT3-like model, tracks denoising steps and
keeps the stored features; ``apply_cache`` / ``remove_cache`` are the public entry points.

Ownership: the model holds its manager (an attribute) and its blocks hold their runners
(instance-level ``forward``); every pointer back — runner to manager, manager to model, hooks to
manager — is a weak reference, so dropping the model frees everything without the cyclic
garbage collector.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import inspect
import logging
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .. import parallel as sp
from ..registry import CACHES, build_module, registered
from ..utils.compile import check_available, compile_options
from . import flops as fl
from . import selection as sel
from .adaptive import decision_groups
from .plan import Action, Kind, StepKind, StepPlan
from .policies import AdaptivePolicy, CachePolicy, NoCache, Scorer, accepted_keys
from .runner import _TAPPED, BlockRunner, ModuleTap, Regions
from .state import BlockState, Codec, Feature, StoredBytes

_ATTR = "_duca_cache_manager"
LOGGER = logging.getLogger("opensora_duca.cache")
_BLOCK_PARTS = ("norm1", "attn", "cross_attn", "norm2", "mlp", "scale_shift_table")
# sessionless runs: a call whose input is not the previous input moved within the span of the
# previous input and outputs (what any first-order or two-step sampler does) starts a new run
CONTINUATION_TOL = 0.05


@dataclass
class BlockSlot:
    block: nn.Module
    name: str            # e.g. "spatial_blocks.3"
    index: int           # position in call order (0 .. 2*depth-1)
    layer: int           # depth index
    is_last: bool
    original: Callable
    state: BlockState


def _temporal_blocks(model: nn.Module) -> list:
    """The model's temporal blocks; none for Open-Sora 1.3's ``skip_temporal`` (an empty list,
    or no attribute at all on upstream's model)."""
    blocks = getattr(model, "temporal_blocks", None)
    return [] if blocks is None else list(blocks)


def _check_model(model: nn.Module) -> None:
    if not isinstance(getattr(model, "spatial_blocks", None), nn.ModuleList):
        raise TypeError(f"apply_cache needs a model with 'spatial_blocks' (an nn.ModuleList of "
                        f"STDiT3 blocks); {type(model).__name__} has none")
    temporal = getattr(model, "temporal_blocks", None)
    if temporal is not None and not isinstance(temporal, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}.temporal_blocks must be an nn.ModuleList")
    temporal = _temporal_blocks(model)
    if temporal and len(model.spatial_blocks) != len(temporal):
        raise TypeError("spatial_blocks and temporal_blocks must have the same length (or no "
                        "temporal blocks, as Open-Sora 1.3's skip_temporal)")
    for blocks in (model.spatial_blocks, temporal):
        for i, blk in enumerate(blocks):
            missing = [p for p in _BLOCK_PARTS if not hasattr(blk, p)]
            if missing:
                raise TypeError(f"block {i} ({type(blk).__name__}) lacks {missing}; apply_cache "
                                f"needs blocks with {list(_BLOCK_PARTS)}")


def _weak_method(method):
    """A callable that calls ``method`` through a weak reference to its object."""
    ref = weakref.WeakMethod(method)

    def call(*args, **kwargs):
        fn = ref()
        return None if fn is None else fn(*args, **kwargs)
    return call


class CacheManager:
    """Owns the policy, the per-block stored features and the step counter of one model."""

    def __init__(self, model: nn.Module, policy: CachePolicy):
        _check_model(model)
        self._model = weakref.ref(model)
        self.policy = policy
        self.regions = Regions()
        self.depth = len(model.spatial_blocks)
        self.codec = Codec(policy.stored_dtype)
        self.order, self.distance = policy.forecast_order, policy.forecast_distance
        self.bytes = StoredBytes()
        self.slots: List[BlockSlot] = []
        self.plan: Optional[StepPlan] = None
        self.step = 0
        self.num_steps: Optional[int] = None
        # (part, parts): this process holds part ``part`` of ``parts`` equal slices of the CFG
        # batch (CFG parallelism: (cfg_rank, 2)); per-batch random draws follow the whole batch
        self.batch_part = (0, 1)
        self._session = False
        self._session_ts: Optional[List[float]] = None  # the run's timesteps, known on the host
        self._timesteps: List[float] = []
        self._last_shape = None
        self._prev_x: Optional[torch.Tensor] = None
        self._prev_outs: List[torch.Tensor] = []
        self._run_y: Optional[torch.Tensor] = None
        self._prev_x_mask = None
        # the model forward's positional parameter names (to read x_mask / mask_index)
        self._arg_names = [n for n in inspect.signature(model.forward).parameters
                           if n not in ("args", "kwargs")]
        # runs: where the open run's counts start; its reason for a split; logging per run
        self.log_runs = False
        self._run_mark: Optional[tuple] = None
        self._run_note: Optional[str] = None
        self._warned_split = False
        self._at_exit = None
        self._trunk = Feature(self.codec, self.bytes, self.order)
        self._store_trunk = False
        # adaptive policies: the stored residual of the blocks from the decision point on, the
        # input at that point in this step, and the policy's run state (references, sums)
        self._residual = Feature(self.codec, self.bytes)
        self._residual_in: Optional[torch.Tensor] = None
        self._trunk_in: Optional[torch.Tensor] = None
        self.adaptive: Dict[str, Any] = {}
        self._groups: List[List[int]] = [[0]]  # adaptive: batch rows deciding together
        self._rows: Optional[torch.Tensor] = None  # rows computing on a per-sample step
        self._sub: Optional[torch.Tensor] = None   # their hidden states between blocks
        self._group = None
        self._grid: Optional[sel.TokenGrid] = None
        self._grid_key = None
        self._shape: Optional[fl.TrunkShape] = None
        self._handles: List[Any] = []
        self._stores = {k: policy.reuses(k) for k in Kind}
        self._validate_scorer(model)
        self._reset_stats()

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:  # pragma: no cover
            raise RuntimeError("the model of this cache manager no longer exists")
        return model

    @property
    def frames(self) -> int:
        return self._shape.frames

    # ------------------------------------------------------------------ wiring
    def attach(self) -> "CacheManager":
        model = self.model
        order = []
        temporal = _temporal_blocks(model)
        self._paired = bool(temporal)
        for i in range(self.depth):
            order.append((f"spatial_blocks.{i}", model.spatial_blocks[i], i))
            if temporal:
                order.append((f"temporal_blocks.{i}", temporal[i], i))
        tap = self.stores_modules()
        for k, (name, blk, layer) in enumerate(order):
            patched = [n for n, mod in [(name, blk), (f"{name}.attn.qkv", blk.attn.qkv)]
                       + [(f"{name}.{a}", getattr(blk, a)) for a in _TAPPED]
                       if "forward" in mod.__dict__]
            if patched:
                raise RuntimeError(f"{patched[0]} already has an instance-level forward "
                                   f"(another cache or patch is attached); remove it first")
            slot = BlockSlot(block=blk, name=name, index=k, layer=layer,
                             is_last=k == len(order) - 1, original=blk.forward,
                             state=BlockState(self.bytes, self.codec, self.order))
            runner = BlockRunner(self, slot)
            blk.forward = runner
            if tap:
                for attr in _TAPPED:
                    runner.taps[attr] = ModuleTap(runner, attr)
                    runner.taps[attr].install(getattr(blk, attr))
            if self.policy.scorer == Scorer.VNORM and self.needs_scores():
                runner.qkv_tap = ModuleTap(None, "qkv")  # records the qkv output for scores
                runner.qkv_tap.install(blk.attn.qkv)
            if self.policy.scorer == Scorer.ATTENTION and self.needs_scores() and \
                    not hasattr(blk.attn, "keep_attn_map"):  # upstream: the map's attn_drop
                runner.map_tap = ModuleTap(None, "map")
                runner.map_tap.install(blk.attn.attn_drop)
            self.slots.append(slot)
        self._handles.append(model.register_forward_pre_hook(_weak_method(self._pre_hook),
                                                             with_kwargs=True))
        self._handles.append(model.register_forward_hook(_weak_method(self._post_hook)))
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
        self.regions = Regions(opts)

    def detach(self) -> None:
        self.reset()
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None
        for slot in self.slots:
            slot.block.__dict__.pop("forward", None)
            attn = slot.block.attn
            for mod in [attn.qkv, getattr(attn, "attn_drop", None)] + \
                    [getattr(slot.block, a) for a in _TAPPED]:
                if mod is not None:
                    ModuleTap.remove(mod)
        for h in self._handles:
            h.remove()
        self.slots, self._handles = [], []
        model = self._model()
        if model is not None and getattr(model, _ATTR, None) is self:
            delattr(model, _ATTR)

    def _validate_scorer(self, model):
        """Scorer 'attention' needs attention maps: this project's attention on the 'math'
        backend returns them; upstream Open-Sora's attention computes them (and passes them
        through its ``attn_drop``) unless it runs a fused kernel (``enable_flash_attn``)."""
        if self.policy.scorer != Scorer.ATTENTION:
            return
        for blocks in (model.spatial_blocks, _temporal_blocks(model)):
            for blk in blocks:
                attn = blk.attn
                if hasattr(attn, "keep_attn_map"):
                    backend = getattr(attn, "backend", None)
                    if backend == "math":
                        continue
                    what = f"uses the {backend!r} attention backend"
                    fix = "build the model with attn_backend='math'"
                elif isinstance(getattr(attn, "attn_drop", None), nn.Module):
                    if not getattr(attn, "enable_flash_attn", False):
                        continue
                    what, fix = ("runs fused attention (enable_flash_attn=True)",
                                 "build the model with enable_flash_attn=False")
                else:
                    what, fix = (f"({type(attn).__name__}) hands back no attention map",
                                 "use an Open-Sora or opensora_duca attention module")
                raise ValueError(
                    f"cache scorer 'attention' needs attention maps, and this model's "
                    f"self-attention {what}; {fix}, or choose scorer 'vnorm' / 'random', which "
                    f"work with fused attention")

    # ------------------------------------------------------------------ runs
    def reset(self) -> None:
        """Forget every stored feature and start counting steps from 0 (the open run, if any,
        is finished: its report is logged where :attr:`log_runs` is set)."""
        self._finish_run()
        for slot in self.slots:
            slot.state.clear()
        self._trunk.clear()
        self._residual.clear()
        self._residual_in = self._trunk_in = None
        self.adaptive = {}
        self._rows = self._sub = None
        self.step = 0
        self.plan = None
        self._timesteps = []
        self._last_shape = None
        self._prev_x, self._prev_outs, self._prev_x_mask = None, [], None
        self._run_y = None

    @contextlib.contextmanager
    def session(self, num_steps: int, timesteps: Optional[Sequence[float]] = None):
        """One sampling run of ``num_steps`` model calls; features are freed at its end.

        ``timesteps`` (optional): the run's ``num_steps`` timesteps as the sampler knows them
        on the host (a list or a CPU tensor). Given, step ``i`` takes ``timesteps[i]`` and the
        model's ``timestep`` argument is never read back from the device, so a run with a fixed
        plan makes no host-device synchronisation."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"session num_steps={num_steps!r}: must be an integer >= 1")
        ts = None
        if timesteps is not None:
            if torch.is_tensor(timesteps) and timesteps.device.type != "cpu":
                raise ValueError(f"session timesteps on {timesteps.device}: pass them on the "
                                 f"host (a list or a CPU tensor), which is what saves the sync")
            ts = [float(t) for t in (timesteps.reshape(-1).tolist() if torch.is_tensor(timesteps)
                                     else timesteps)]
            if len(ts) != num_steps:
                raise ValueError(f"session timesteps has {len(ts)} values; accepted: one per "
                                 f"step (num_steps={num_steps})")
        self.policy.validate_run(num_steps)
        self.reset()
        self.num_steps, self._session, self._session_ts = num_steps, True, ts
        try:
            yield self
        finally:
            self.reset()
            self.num_steps, self._session, self._session_ts = None, False, None

    def _continues(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> Optional[str]:
        """Sessionless runs: None when ``x`` continues the run, else why not.

        ``x`` continues when, per sample, it is the previous input moved within the span of the
        previous input and the last two calls' outputs (least squares, relative residual at
        most ``CONTINUATION_TOL``), measured on the frames the sampler does not overwrite
        (``keep`` [B, T] bool, None: all): the reference frames of a frame-conditioned loop and
        the conditioned frames of i2v / v2v are set by the sampler, not moved by the model.
        Inner products are accumulated per frame in float64, a few frames at a time."""
        if self._prev_x is None or not self._prev_outs:
            return "no previous step"
        b, cin, frames = x.shape[:3]
        outs = [o[:, :cin] for o in self._prev_outs
                if o.shape[0] == b and o.shape[1] >= cin and o.shape[2:] == x.shape[2:]]
        if not outs:
            return "the previous outputs do not match the input's shape"
        w = torch.ones(b, frames, dtype=torch.float64) if keep is None else keep.double().cpu()
        if not bool((w.sum(1) > 0).any()):
            return "every frame of the input is set by the sampler"
        vecs = [self._prev_x] + outs
        k = b * len(vecs)
        gram = torch.zeros(frames, k, k, dtype=torch.float64, device=x.device)
        proj = torch.zeros(frames, k, b, dtype=torch.float64, device=x.device)
        norm2 = torch.zeros(frames, b, dtype=torch.float64, device=x.device)
        per_frame = x[0, 0, 0].numel() * cin * k * 8
        chunk = max(1, (64 << 20) // max(per_frame, 1))
        for f0 in range(0, frames, chunk):
            sl = slice(f0, min(f0 + chunk, frames))
            v = torch.cat([t[:, :, sl].detach().double().transpose(1, 2).reshape(
                b, sl.stop - f0, -1) for t in vecs]).transpose(0, 1)        # [f, K, D]
            d = (x[:, :, sl].detach().double() - self._prev_x[:, :, sl].double()).transpose(
                1, 2).reshape(b, sl.stop - f0, -1).transpose(0, 1)          # [f, B, D]
            gram[sl] = v @ v.transpose(1, 2)
            proj[sl] = v @ d.transpose(1, 2)
            norm2[sl] = (d * d).sum(-1)
        gram, proj, norm2 = gram.cpu(), proj.cpu(), norm2.cpu()
        worst = 0.0
        for i in range(b):
            if not bool(w[i].any()):
                continue
            idx = [i] + list(range(b, k))  # this sample's previous input, every output row
            g = (w[i, :, None, None] * gram[:, idx][:, :, idx]).sum(0)
            r = (w[i, :, None] * proj[:, idx, i]).sum(0)
            d2 = float((w[i] * norm2[:, i]).sum())
            c = torch.linalg.pinv(g, hermitian=True) @ r
            resid2 = d2 - 2 * float(c @ r) + float(c @ g @ c)
            worst = max(worst, (max(resid2, 0.0) / d2) ** 0.5 if d2 > 0 else 0.0)
        if worst <= CONTINUATION_TOL:
            return None
        return (f"the input is not the previous step's latents moved by the model's outputs "
                f"(relative residual {worst:.3g} > {CONTINUATION_TOL})")

    def _kept_frames(self, x: torch.Tensor, x_mask, mask_index) -> Optional[torch.Tensor]:
        """[B, T] bool: the frames of ``x`` the sampler moves with the model's output, neither
        held at a reference (``x_mask`` False, now or at the previous step) nor conditioned
        (i2v / v2v ``mask_index``, which SDEdit re-noises every step); None: every frame."""
        b, _, frames = x.shape[:3]
        keep = None
        for m in (x_mask, self._prev_x_mask):
            if torch.is_tensor(m) and tuple(m.shape) == (b, frames):
                m = m.detach().bool().cpu()
                keep = m if keep is None else keep & m
        if mask_index is not None and len(mask_index) > 0:
            keep = torch.ones(b, frames, dtype=torch.bool) if keep is None else keep.clone()
            keep[:, [int(i) for i in mask_index if 0 <= int(i) < frames]] = False
        return keep

    def _arg(self, args, kwargs, name: str):
        """The model call's argument ``name`` (keyword, or positional by the forward's
        signature), None when not given."""
        if name in kwargs:
            return kwargs[name]
        i = self._arg_names.index(name) if name in self._arg_names else None
        return args[i] if i is not None and i < len(args) else None

    def _split(self, why: str, t: float) -> None:
        """A sessionless run ends although the timestep went down: say so once."""
        self._run_note = f"runs were split: {why}"
        if not self._warned_split:
            self._warned_split = True
            warnings.warn(f"cache: the model call at timestep {t:g} does not continue the "
                          f"previous step ({why}); a new run starts, nothing stored is reused "
                          f"and its first steps are computed in full. If these calls are one "
                          f"sampling run, run them inside manager.session(num_steps=...)",
                          RuntimeWarning, stacklevel=3)

    def _check_grad(self, model):
        if torch.is_grad_enabled() and self.storing_anything() and any(
                p.requires_grad for p in model.parameters()):
            raise RuntimeError(
                f"cache policy {self.policy.name!r} reuses stored features and runs only for "
                f"sampling: call the model under torch.no_grad() (or torch.inference_mode()), "
                f"or use policy 'none' when gradients are needed")

    def _pre_hook(self, model, args, kwargs):
        self._check_grad(model)
        x = args[0] if args else kwargs.get("x")
        y = args[2] if len(args) > 2 else kwargs.get("y")
        t = self._timestep(args[1] if len(args) > 1 else kwargs.get("timestep"), x, y)
        shape = tuple(x.shape)
        last_t = self._timesteps[-1] if self._timesteps else None
        new_run = self._last_shape is not None and shape != self._last_shape
        same_y = self._run_y is None or y is self._run_y or (
            y is not None and y.shape == self._run_y.shape and torch.equal(y, self._run_y))
        if self._session:
            done = self.num_steps is not None and self.step >= self.num_steps
            if not (new_run or done) and last_t is not None and (t >= last_t or not same_y):
                what = (f"has timestep {t:g}, not below the previous step's {last_t:g}"
                        if t >= last_t else "has other captions than the run's previous steps")
                raise RuntimeError(
                    f"cache session: step {self.step} {what}; inside a session every model "
                    f"call must be the next denoising step of the same batch. Batch the "
                    f"conditional and unconditional passes into one call (a CFG batch), or run "
                    f"each sampling run in its own session")
            new_run = new_run or done
        else:
            new_run = new_run or not same_y
            if last_t is not None and t == last_t and shape == self._last_shape:
                warnings.warn("cache: two model calls with the same timestep: each starts a new "
                              "run, so nothing is reused; batch the conditional and "
                              "unconditional passes into one call to benefit from the cache",
                              RuntimeWarning, stacklevel=2)
            new_run = new_run or last_t is None or t >= last_t
            if not new_run:
                x_mask, mask_index = (self._arg(args, kwargs, n) for n in ("x_mask", "mask_index"))
                why = self._continues(x, self._kept_frames(x, x_mask, mask_index))
                if why is not None:
                    new_run = True
                    self._split(why, t)
        if new_run:
            self.reset()
        if not self._session:
            self._prev_x = x.detach()
            self._prev_x_mask = self._arg(args, kwargs, "x_mask")
        self._run_y = y
        if not self._timesteps:
            self.runs += 1
            self._open_run()
            if isinstance(self.policy, AdaptivePolicy):
                self._groups = decision_groups(x)
        self._timesteps.append(t)
        self._last_shape = shape
        tick = time.perf_counter()
        if self.num_steps is not None and self.step == 0:
            self.policy.validate_run(self.num_steps)
        plan = self.policy.plan(self.step, self.num_steps, self._timesteps)
        if plan.decide_at and not self._paired:  # block pairs are single blocks here
            plan = dataclasses.replace(plan, decide_at=plan.decide_at // 2)
        if plan.skip_trunk and self._trunk.shape is None:
            raise RuntimeError(f"policy {self.policy.name!r} skips the trunk at step {self.step} "
                               f"but no trunk output was computed before it in this run")
        self.plan = plan
        # the trunk output is kept for the next step's skip, or, when forecasting, at every
        # step that computes it (the anchors of its differences)
        self._store_trunk = not plan.skip_trunk and (
            (self.order > 0 and self.policy.skips_trunk()) or
            self.policy.skips_trunk_at(self.step + 1, self.num_steps, self._timesteps + [t]))
        self._set_shapes(model, x, y)
        self.bookkeeping_s += time.perf_counter() - tick
        return None

    def _timestep(self, ts, x, y) -> float:
        """This call's timestep: the session's host value for the coming step when it was
        given (and this call continues the run), else read from the argument."""
        known = self._session_ts
        if known is not None and self.step < len(known) and (
                self._last_shape is None or tuple(x.shape) == self._last_shape) and (
                self._run_y is None or y is self._run_y):
            return known[self.step]
        return float(torch.as_tensor(ts).reshape(-1)[0])

    def _post_hook(self, model, args, out):
        if self.plan is not None:  # the step's final plan (adaptive policies decide mid-step)
            self.step_labels.append(self.plan.label)
            self._account_flops(self.plan)
        self.step += 1
        self.plan = None
        if not self._session and torch.is_tensor(out):
            self._prev_outs = [out.detach()] + self._prev_outs[:1]
        if self.num_steps is not None and self.step >= self.num_steps:
            for slot in self.slots:  # the run is over: free everything
                slot.state.clear()
            self._trunk.clear()
            self._residual.clear()
            self.adaptive = {}
        self._group = None  # hold no process group between calls (set again by the next one)
        return None

    def _set_shapes(self, model, x, y):
        pt, ph, pw = getattr(model, "patch_size", (1, 2, 2))
        _, _, tx, hx, wx = x.shape
        T, H, W = -(-tx // pt), -(-hx // ph), -(-wx // pw)
        group = None
        if getattr(model, "enable_sequence_parallelism", False):
            getter = getattr(model, "sequence_parallel_group", None)
            group = getter() if callable(getter) else sp.get_sequence_parallel_group()
        self._group = group
        self._grid_key = (T, H, W, sp.group_size(group), sp.group_rank(group))
        self._grid = None
        blk = self.slots[0].block
        temporal = _temporal_blocks(model)
        kernel = getattr(temporal[0].attn, "kernel_size", None) if temporal else None
        self._shape = fl.TrunkShape(batch=x.shape[0], frames=T, spatial=H * W,
                                    hidden=blk.scale_shift_table.shape[-1], depth=self.depth,
                                    caption_len=int(y.shape[-2]) if y is not None else 0,
                                    mlp_hidden=blk.mlp.fc1.out_features,
                                    temporal=bool(temporal),
                                    temporal_kernel=None if kernel is None else tuple(kernel),
                                    rows=H, width=W)

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
    def stores(self, kind: Kind) -> bool:
        return self._stores[kind]

    def uses_selection(self, kind: Kind) -> bool:
        return kind in (Kind.MLP, Kind.CROSS_ATTN) and self.policy.scorer is not None

    def storing_anything(self) -> bool:
        return self.policy.skips_trunk() or self.stores_modules()

    def stores_modules(self) -> bool:
        return any(self._stores.values())

    def needs_scores(self) -> bool:
        return self.policy.scorer in (Scorer.VNORM, Scorer.ATTENTION) and \
            (self._stores[Kind.MLP] or self._stores[Kind.CROSS_ATTN])

    def after_block(self, slot: BlockSlot, out: torch.Tensor) -> None:
        if slot.is_last and self._store_trunk:
            self._trunk.update(out, self.at)
        if slot.is_last and self._residual_in is not None:
            self._residual.update(out - self._residual_in, self.at)
        if slot.is_last:
            self._residual_in = self._trunk_in = self._rows = self._sub = None

    # ----------------------------------------------------- adaptive policies
    def decide(self, slot: BlockSlot, x: torch.Tensor, bound: Optional[dict]) -> StepPlan:
        """At block ``plan.decide_at``: measure the change of every decision group (one
        all_gather), let the policy decide per group, and set this step's final plan: compute
        the rest of the trunk, skip it (add the stored residual), or compute it for the rows
        of the groups that need it (``computed_rows``) while the others take their residual."""
        from .adaptive import group_rows, relative_l1
        from .runner import modulated_input

        pol, st, groups = self.policy, self.adaptive, self._groups
        if pol.measure == "modulated_input":
            now = modulated_input(slot.block, **bound)
        else:  # first_pair_residual: what the blocks before this one added
            now = x - self._trunk_in
        ref = st.get("reference")
        changes: List[Optional[float]] = [None] * len(groups)
        if ref is not None and ref.shape == now.shape and self._residual.shape is not None:
            changes = relative_l1(now, ref, self.grid_for(x.shape[1]), self._group, groups)
        states = st.setdefault("groups", [{} for _ in groups])
        flags = [bool(pol.decide(self.step, self.num_steps, c, g))
                 for c, g in zip(changes, states)]
        self.changes.append(changes)
        self.group_labels.append([str(StepKind.FULL if f else StepKind.RESIDUAL)
                                  for f in flags])
        if pol.reference_every_step or all(flags) or ref is None or ref.shape != now.shape:
            st["reference"] = now
        elif any(flags):
            rows = torch.tensor(group_rows(groups, flags), device=now.device)
            st["reference"] = ref.index_copy(0, rows, now.index_select(0, rows))
        if all(flags):
            self._residual_in = x
            self.plan = StepPlan(label=self.plan.label)
        elif any(flags):
            rows = group_rows(groups, flags)
            self._rows = torch.tensor(rows, device=x.device)
            self._sub = None
            self.plan = StepPlan(residual_from=slot.index, computed_rows=tuple(rows),
                                 label=StepKind.MIXED)
        else:
            self.plan = StepPlan(residual_from=slot.index, label=StepKind.RESIDUAL)
        return self.plan

    def residual_output(self, x: torch.Tensor) -> torch.Tensor:
        """Last block of a skipped step: its input (the input at the decision point, passed
        through) plus the stored residual."""
        return x + self._residual.value(self.at, x.dtype)

    def mixed_output(self, x: torch.Tensor, sub: torch.Tensor) -> torch.Tensor:
        """Last block of a step decided per sample: the rows that computed the trunk take
        ``sub`` (their sub-batch output) and store their new residual; the others take their
        input (passed through from the decision point) plus their stored residual."""
        rows, self._sub = self._rows, None
        out = self.residual_output(x).index_copy_(0, rows, sub)
        self._residual.write_rows_(rows, sub - x.index_select(0, rows))
        return out

    def trunk_output(self, x: torch.Tensor) -> torch.Tensor:
        if self._trunk.shape is None or tuple(self._trunk.shape) != tuple(x.shape):
            raise RuntimeError("aggressive step: no stored trunk output of this shape")
        return self._trunk.value(self.at, x.dtype)

    @property
    def at(self) -> float:
        """Where the current step sits for forecasting: its index, or its timestep."""
        return float(self.step) if self.distance == "step" else self._timesteps[-1]

    # ------------------------------------------------------------------ stats
    def reset_stats(self) -> None:
        """Start the counts of :meth:`stats` again (stored features are kept)."""
        self._reset_stats()

    def _reset_stats(self):
        self.runs = 0
        # adaptive policies, per step: the measured change and the decision of each group
        self.changes: List[List[Optional[float]]] = []
        self.group_labels: List[List[str]] = []
        self.step_labels: List[str] = []
        self.module_counts: Dict[str, Dict[str, int]] = {}
        self.partial_tokens = 0
        self.flops_uncached = 0.0
        self.flops_actual = 0.0
        self.step_flops: List[float] = []
        self.bookkeeping_s = 0.0
        self.bytes.peak = self.bytes.current
        if getattr(self, "_run_mark", None) is not None:  # the open run counts from here
            self._run_mark = (0, 0.0, 0.0, self._run_mark[3])

    def count_module(self, kind: str, action: Action) -> None:
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
                for k, a in plan.actions.items() if a == Action.PARTIAL}
        self.flops_uncached += fl.full_step_flops(shape)
        self.step_flops.append(fl.step_flops(shape, plan, part))
        self.flops_actual += self.step_flops[-1]

    def stats(self) -> dict:
        """Counts since the cache was attached (or :meth:`reset_stats`), summed over every run
        and session, so a tool that generates in batches reports all of them: steps by kind,
        module actions, FLOPs ratio (uncached / actual, analytic), peak stored bytes,
        bookkeeping seconds. :meth:`run_summary` has the current run's.

        ``bookkeeping_s`` is host time spent planning, selecting tokens and gathering /
        scattering them, measured with ``time.perf_counter`` and no device synchronisation: on
        a CPU it is the real cost, on CUDA it is the launch overhead only (use
        ``tools/benchmark.py`` for device time).

        Adaptive policies decide per clip: ``groups`` are the batch rows that decide together
        (a clip's CFG copies) in the last run, and per step ``changes`` holds each group's
        measured change (None: nothing to compare with) and ``group_labels`` its decision."""
        by_kind: Dict[str, int] = {}
        for lab in map(str, self.step_labels):
            by_kind[lab] = by_kind.get(lab, 0) + 1
        return {
            "policy": self.policy.describe(),
            "steps": len(self.step_labels),
            "runs": self.runs,
            "steps_by_kind": by_kind,
            "step_labels": [str(lab) for lab in self.step_labels],
            "modules": {str(k): {str(a): n for a, n in v.items()}
                        for k, v in self.module_counts.items()},
            "partial_tokens": self.partial_tokens,
            "flops_uncached": self.flops_uncached,
            "flops_actual": self.flops_actual,
            "step_flops": list(self.step_flops),
            "flops_ratio": (self.flops_uncached / self.flops_actual) if self.flops_actual else
            (float("inf") if self.flops_uncached else 1.0),
            "peak_stored_bytes": self.bytes.peak,
            "stored_bytes": self.bytes.current,
            "bookkeeping_s": self.bookkeeping_s,
            "changes": [list(c) for c in self.changes],
            "groups": [list(g) for g in self._groups],
            "group_labels": [list(g) for g in self.group_labels],
        }

    def _open_run(self) -> None:
        self._run_mark = (len(self.step_labels), self.flops_uncached, self.flops_actual,
                          self._run_note)
        self._run_note = None
        self.bytes.run_peak = self.bytes.current
        if self.log_runs and self._at_exit is None:  # the last run of the process, too
            ref = weakref.ref(self)
            self._at_exit = lambda: ref() is not None and ref()._finish_run()
            atexit.register(self._at_exit)

    def run_summary(self) -> Optional[dict]:
        """Counts of the open (or just finished) run: policy, steps by kind, FLOPs ratio, peak
        stored bytes, and ``note``: why no step could be cached, when none was."""
        if self._run_mark is None:
            return None
        start, unc0, act0, note = self._run_mark
        labels = [str(lab) for lab in self.step_labels[start:]]
        by_kind: Dict[str, int] = {}
        for lab in labels:
            by_kind[lab] = by_kind.get(lab, 0) + 1
        unc, act = self.flops_uncached - unc0, self.flops_actual - act0
        cached = [lab for lab in labels if lab not in (str(StepKind.FULL),)]
        if not cached and self.storing_anything():
            note = note or self._run_note or (
                f"the run had {len(labels)} step(s), all computed in full by the policy's "
                f"plan")
        else:
            note = None
        return {"policy": self.policy.name, "steps": len(labels), "steps_by_kind": by_kind,
                "flops_ratio": unc / act if act else (float("inf") if unc else 1.0),
                "peak_stored_bytes": self.bytes.run_peak, "note": note}

    def _finish_run(self) -> None:
        """The open run is over: log its report once (rank 0) where :attr:`log_runs` is set."""
        summary = self.run_summary()
        self._run_mark = None
        if summary is None or not summary["steps"] or not self.log_runs or sp.global_rank():
            return
        kinds = ", ".join(f"{n} {k}" for k, n in summary["steps_by_kind"].items())
        line = (f"opensora_duca cache: run {self.runs} finished: {summary['policy']}, "
                f"{summary['steps']} steps, {summary['flops_ratio']:.2f}x fewer FLOPs, peak "
                f"{summary['peak_stored_bytes'] / 2**20:.1f} MiB stored")
        rows = [f"  {'policy':<15}: {summary['policy']}",
                f"  {'steps':<15}: {summary['steps']} ({kinds})",
                f"  {'FLOPs ratio':<15}: {summary['flops_ratio']:.2f}x fewer than uncached "
                f"(analytic, trunk matmuls)",
                f"  {'peak cache mem':<15}: {summary['peak_stored_bytes'] / 2**20:.1f} MiB"]
        if summary["note"]:
            rows.append(f"  {'no step cached':<15}: {summary['note']}")
        LOGGER.info("%s\n%s", line, "\n".join(rows))

    def report(self) -> str:
        s = self.stats()
        kinds = ", ".join(f"{v} {k}" for k, v in s["steps_by_kind"].items())
        return "\n".join([
            f"cache policy   : {s['policy']['type']}",
            f"steps          : {s['steps']} ({kinds})",
            f"FLOPs ratio    : {s['flops_ratio']:.2f}x fewer than uncached "
            f"(analytic, trunk matmuls)",
            f"peak cache mem : {s['peak_stored_bytes'] / 2**20:.1f} MiB",
            f"bookkeeping    : {s['bookkeeping_s'] * 1e3:.1f} ms (host time)",
        ])


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
    accepted = accepted_keys(CACHES.get(typ))
    for k in cfg:
        if k != "type" and k not in accepted:
            raise ValueError(f"cache policy {typ!r}: unknown key {k!r}={cfg[k]!r}; "
                             f"accepted keys: {sorted(accepted)}")
    return build_module(cfg, CACHES)


def apply_cache(model: nn.Module, cfg: Any = None, compile: Any = None) -> CacheManager:
    """Attach a cache policy (``dict(type=...)`` or a policy object) to ``model`` and return its
    manager. The model's blocks are patched per instance; :func:`remove_cache` undoes it.

    ``compile`` (see :meth:`CacheManager.set_compile`) runs the per-block work compiled with
    torch.compile; with policy ``none`` that is the compiled uncached model."""
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError("this model already has a cache attached; call remove_cache(model) "
                           "first")
    mgr = CacheManager(model, build_policy(cfg))
    mgr.set_compile(compile)
    return mgr.attach()


def remove_cache(model: nn.Module) -> None:
    """Detach the cache from ``model``, restoring it exactly (no-op when none is attached)."""
    mgr = getattr(model, _ATTR, None)
    if mgr is not None:
        mgr.detach()


def get_cache_manager(model: nn.Module) -> Optional[CacheManager]:
    return getattr(model, _ATTR, None)
