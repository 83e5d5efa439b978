"""Run boundaries: which sampling run and which step a model call belongs to.

With ``manager.session(num_steps)`` the boundaries are given. Without one (upstream's scripts),
a call starts a new run when its input shape or captions change, when its timestep does not
decrease, or when its input does not continue the previous step: the input must be the previous
input moved within the span of the previous input and the last two outputs (per clip, least
squares, relative residual at most :data:`CONTINUATION_TOL`), measured on the frames the sampler
moves with the model's output — frames held at a reference (``x_mask`` False) and conditioned
frames (i2v / v2v ``mask_index``, which SDEdit re-noises every step) are set by the sampler and
left out. The latents' own rounding (about ``u |x|`` per element, ``u`` the unit roundoff of
their dtype: a bf16 sampler) is allowed on top of the tolerance, and a timestep equal to the
previous one (a dense schedule rounded to bf16) continues the run when the latents moved and
the test passes. A run split that way warns once, with the reason.
"""
from __future__ import annotations

import inspect
import warnings
from typing import List, Optional, Sequence

import torch

# sessionless runs: a call whose input is not the previous input moved within the span of the
# previous input and outputs (what any first-order or two-step sampler does) starts a new run
CONTINUATION_TOL = 0.05


def host_timesteps(num_steps, timesteps) -> Optional[List[float]]:
    """A session's ``num_steps`` (checked) and its optional host timesteps as floats."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"session num_steps={num_steps!r}: must be an integer >= 1")
    if timesteps is None:
        return None
    if torch.is_tensor(timesteps) and timesteps.device.type != "cpu":
        raise ValueError(f"session timesteps on {timesteps.device}: pass them on the host (a "
                         f"list or a CPU tensor), which is what saves the sync")
    ts = [float(t) for t in (timesteps.reshape(-1).tolist() if torch.is_tensor(timesteps)
                             else timesteps)]
    if len(ts) != num_steps:
        raise ValueError(f"session timesteps has {len(ts)} values; accepted: one per step "
                         f"(num_steps={num_steps})")
    return ts


def _requires_grad(values) -> bool:
    return any(torch.is_tensor(v) and v.requires_grad for v in values)


def check_grad(model, policy: str, stores: bool, args=(), kwargs=None) -> None:
    """A caching policy runs only for sampling: refuse a call that builds a graph (through the
    model's parameters, or through an input that requires grad with the parameters frozen:
    stored features would keep that graph alive)."""
    if torch.is_grad_enabled() and stores and (
            any(p.requires_grad for p in model.parameters())
            or _requires_grad(args) or _requires_grad((kwargs or {}).values())):
        raise RuntimeError(
            f"cache policy {policy!r} reuses stored features and runs only for sampling: call "
            f"the model under torch.no_grad() (or torch.inference_mode()), or use policy "
            f"'none' when gradients are needed")


class RunTracker:
    """The step counter and run boundaries of one model's calls."""

    def __init__(self, forward, layout=None):
        # the model forward's positional parameter names (to read x_mask / mask_index)
        self._arg_names = [n for n in inspect.signature(forward).parameters
                           if n not in ("args", "kwargs")]
        # the names of the latents, timestep and captions in a model call, how a timestep
        # maps to the 0..1000 scale the policies plan in, and the latents as [B, C, T, H, W]
        self._call_names = getattr(layout, "CALL_ARGS", ("x", "timestep", "y"))
        self._t_scale = float(getattr(layout, "TIMESTEP_SCALE", 1.0))
        self._latents = getattr(layout, "latents", None) or (lambda v: v)
        self.step = 0
        self.num_steps: Optional[int] = None
        self.in_session = False
        self._session_ts: Optional[List[float]] = None  # the run's timesteps, on the host
        self.warned_split = False
        self.note: Optional[str] = None  # why the current run was split from the previous
        self.clear()

    def clear(self) -> None:
        """Forget the run: the next call is its first step."""
        self.step = 0
        self.timesteps: List[float] = []
        self._last_shape = None
        self._prev_x: Optional[torch.Tensor] = None
        self._prev_outs: List[torch.Tensor] = []
        self._prev_x_mask = None
        self._run_y: Optional[torch.Tensor] = None

    def open_session(self, num_steps: int, ts: Optional[Sequence[float]]) -> None:
        self.num_steps, self.in_session, self._session_ts = num_steps, True, ts

    def close_session(self) -> None:
        self.num_steps, self.in_session, self._session_ts = None, False, None

    @property
    def done(self) -> bool:
        return self.num_steps is not None and self.step >= self.num_steps

    def arg(self, args, kwargs, name: str):
        """The model call's argument ``name`` (keyword, or positional by the forward's
        signature), None when not given."""
        if name in kwargs:
            return kwargs[name]
        i = self._arg_names.index(name) if name in self._arg_names else None
        return args[i] if i is not None and i < len(args) else None

    # ------------------------------------------------------------------ a call
    def begin(self, args, kwargs):
        """(x, y, t, new_run) of a model call: whether it starts a new run."""
        x, ts, y = (self.arg(args, kwargs, n) for n in self._call_names)
        if x is None and args:  # a forward with other parameter names: (x, timestep, y, ...)
            x, ts, y = (args[i] if i < len(args) else None for i in range(3))
        x = self._latents(x)
        t = self._timestep(ts, x, y)
        shape = tuple(x.shape)
        last_t = self.timesteps[-1] if self.timesteps else None
        new_run = self._last_shape is not None and shape != self._last_shape
        same_y = self._run_y is None or y is self._run_y or (
            y is not None and y.shape == self._run_y.shape and torch.equal(y, self._run_y))
        if self.in_session:
            if self.done and not new_run:
                raise RuntimeError(
                    f"cache session: session(num_steps={self.num_steps}) is over, but the "
                    f"model was called again (call {self.step + 1}); pass the sampler's number "
                    f"of model calls as num_steps (one session per sampling run)")
            # timesteps that round to the same value (bf16, dense schedules) are the sampler's
            if not new_run and last_t is not None and (t > last_t or not same_y):
                passed = self._passed_timestep(ts)
                what = (f"has timestep {passed:g}, not below the previous step's {last_t:g}"
                        if t > last_t else "has other captions than the run's previous steps")
                raise RuntimeError(
                    f"cache session: step {self.step} {what}; inside a session every model "
                    f"call must be the next denoising step of the same batch. Batch the "
                    f"conditional and unconditional passes into one call (a CFG batch), or run "
                    f"each sampling run in its own session")
            return x, y, t, new_run
        new_run = new_run or not same_y
        same_t = last_t is not None and t == last_t and shape == self._last_shape
        if same_t and (not same_y or torch.equal(x, self._prev_x)):
            warnings.warn("cache: two model calls with the same timestep: each starts a new "
                          "run, so nothing is reused; batch the conditional and "
                          "unconditional passes into one call to benefit from the cache",
                          RuntimeWarning, stacklevel=4)
            new_run = True
        # an equal timestep with moved latents: the sampler's timesteps rounded to the same
        # value (bf16); the continuation test decides
        new_run = new_run or last_t is None or t > last_t
        if not new_run:
            x_mask, mask_index = (self.arg(args, kwargs, n) for n in ("x_mask", "mask_index"))
            why = self._continues(x, self._kept_frames(x, x_mask, mask_index))
            if why is not None:
                self._split(why, t)
                new_run = True
        return x, y, t, new_run

    def record(self, x, y, t, args, kwargs) -> bool:
        """Note the call's input (after a reset for a new run); True on a run's first step."""
        if not self.in_session:
            self._prev_x = x.detach()
            self._prev_x_mask = self.arg(args, kwargs, "x_mask")
        self._run_y = y
        first = not self.timesteps
        self.timesteps.append(t)
        self._last_shape = tuple(x.shape)
        return first

    def end(self, out) -> None:
        """After the call: the next one is the next step."""
        self.step += 1
        if not self.in_session and torch.is_tensor(out):
            self._prev_outs = [self._latents(out).detach()] + self._prev_outs[:1]

    def _passed_timestep(self, ts) -> float:
        """The timestep the call passed (read back from the device: only on an error path)."""
        return float(torch.as_tensor(ts).reshape(-1)[0]) * self._t_scale

    def _timestep(self, ts, x, y) -> float:
        """This call's timestep: the session's host value for the coming step when it was
        given (and this call continues the run), else read from the argument."""
        known = self._session_ts
        if known is not None and self.step < len(known) and (
                self._last_shape is None or tuple(x.shape) == self._last_shape) and (
                self._run_y is None or y is self._run_y):
            return known[self.step] * self._t_scale
        return self._passed_timestep(ts)

    def _split(self, why: str, t: float) -> None:
        """A sessionless run ends although the timestep went down: say so once."""
        self.note = f"runs were split: {why}"
        if not self.warned_split:
            self.warned_split = True
            warnings.warn(f"cache: the model call at timestep {t:g} does not continue the "
                          f"previous step ({why}); a new run starts, nothing stored is reused "
                          f"and its first steps are computed in full. If these calls are one "
                          f"sampling run, run them inside manager.session(num_steps=...)",
                          RuntimeWarning, stacklevel=5)

    # ------------------------------------------------------------------ continuation
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

    def _continues(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> Optional[str]:
        """None when ``x`` continues the run, else why not (module docstring). Inner products
        are accumulated per frame in float64, a few frames at a time."""
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
        size2 = torch.zeros(frames, b, dtype=torch.float64, device=x.device)  # |x|^2+|x_prev|^2
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
            for t in (x, self._prev_x):
                size2[sl] += t[:, :, sl].detach().double().square().transpose(1, 2).reshape(
                    b, sl.stop - f0, -1).sum(-1).transpose(0, 1)
        gram, proj, norm2, size2 = gram.cpu(), proj.cpu(), norm2.cpu(), size2.cpu()
        # the latents' own rounding (a bf16 sampler stores each step rounded to about u |x|)
        # is not a departure from the run: it is allowed on top of the relative tolerance
        u2 = (torch.finfo(x.dtype).eps / 2) ** 2 if x.dtype.is_floating_point else 0.0
        worst = 0.0
        for i in range(b):
            if not bool(w[i].any()):
                continue
            idx = [i] + list(range(b, k))  # this sample's previous input, every output row
            g = (w[i, :, None, None] * gram[:, idx][:, :, idx]).sum(0)
            r = (w[i, :, None] * proj[:, idx, i]).sum(0)
            d2 = float((w[i] * norm2[:, i]).sum())
            c = torch.linalg.pinv(g, hermitian=True) @ r
            resid2 = max(d2 - 2 * float(c @ r) + float(c @ g @ c), 0.0)
            floor2 = u2 * float((w[i] * size2[:, i]).sum())
            if resid2 <= CONTINUATION_TOL ** 2 * d2 + floor2:
                continue
            worst = max(worst, (resid2 / d2) ** 0.5 if d2 > 0 else float("inf"))
        if worst == 0.0:
            return None
        return (f"the input is not the previous step's latents moved by the model's outputs "
                f"(relative residual {worst:.3g} > {CONTINUATION_TOL})")
