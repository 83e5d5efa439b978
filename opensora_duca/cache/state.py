"""What the cache keeps between steps: stored features (optionally as a short history of finite
differences, for forecasting), how they are encoded (``stored_dtype``), and the byte accounting.

A :class:`Feature` is updated at the steps where its module is computed and read at the steps
where it is reused. With forecasting order 0 it is the last computed value (reuse). With order k
it keeps the value and its first k finite differences with respect to the distance variable (the
step index or the timestep): at an anchor ``a`` with gap ``h`` to the previous anchor,
``D0 = f(a)``, ``D(i+1) = (Di(a) - Di(previous)) / h``; a read at ``a + d`` returns the Taylor
polynomial ``sum_i Di d^i / i!`` (TaylorSeer's expansion). Fewer anchors than k + 1 give a lower
order.

With ``method="bdf2"`` (features as the solution of an ODE in the distance variable, after
FoCa) a Feature keeps the values at its last three anchors ``F0, F1, F2`` (at ``a0 > a1 > a2``,
gaps ``h1 = a0 - a1``, ``h2 = a1 - a2``, any spacing). The derivative at ``a0`` is the
three-point backward (BDF2) formula, ``D = F0 (2h1 + h2) / (h1 (h1 + h2)) - F1 (h1 + h2) /
(h1 h2) + F2 h1 / (h2 (h1 + h2))`` (exact for quadratics), and a read at ``a0 + d`` is the
predictor ``P = F0 + d D``. The ``"heun"`` corrector then takes the BDF2 derivative at the
predicted point, ``DP`` from ``(F1, F0, P)`` at ``(a1, a0, a0 + d)``, and returns ``F0 + d (D +
DP) / 2`` (the trapezoidal, Heun-style, average of the two slopes). Two anchors give the linear
extrapolation, one the stored value. Every read-out is a linear combination of the stored
values whose coefficients are computed once per read, on the host, in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0


class StoredBytes:
    """Running total and peak of the bytes held by stored features (``peak`` since the
    statistics were reset, ``run_peak`` since the current run started)."""

    def __init__(self):
        self.current = 0
        self.peak = 0
        self.run_peak = 0

    def add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        self.run_peak = max(self.run_peak, self.current)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Forecast arithmetic runs in float32 at least (float64 for float64 models)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class Encoded:
    """A stored tensor: ``data`` in the store's dtype, and for fp8 a per-token scale. ``owned``:
    ``data`` is the cache's own tensor (a copy, or a difference it computed), never handed out,
    so an update may write into it; a tensor the model gave (``Encoded(x.contiguous())`` keeps
    it) or one a read-out returned as is is not."""

    data: torch.Tensor
    scale: Optional[torch.Tensor] = None
    owned: bool = False

    @property
    def nbytes(self) -> int:
        return _nbytes(self.data) + _nbytes(self.scale)

    @property
    def shape(self):
        return self.data.shape


class Codec:
    """How features are stored. ``None`` keeps the model's tensors as they are; ``fp32`` /
    ``fp16`` / ``bf16`` cast; the 8-bit stores keep one float32 scale per token (its largest
    magnitude over the channels mapped to the code's largest value): ``fp8`` float8_e4m3fn
    (kept as bytes so gathers and scatters work on every device), ``int8`` symmetric integers
    (round to nearest, -127..127)."""

    CASTS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

    def __init__(self, stored_dtype: Optional[str]):
        self.name = stored_dtype
        self.fp8, self.int8 = stored_dtype == "fp8", stored_dtype == "int8"
        self.cast = self.CASTS.get(stored_dtype)
        self._fp8_table: Optional[torch.Tensor] = None
        if self.fp8 and not hasattr(torch, "float8_e4m3fn"):  # pragma: no cover - torch < 2.1
            raise ValueError("stored_dtype='fp8' needs torch >= 2.1 (float8_e4m3fn)")

    def keeps(self, dtype: torch.dtype) -> bool:
        """Whether a tensor of ``dtype`` is stored as it is (no cast, no quantisation)."""
        return not (self.fp8 or self.int8) and (self.cast is None or self.cast == dtype)

    def encode(self, x: torch.Tensor) -> Encoded:
        if self.fp8 or self.int8:
            top = FP8_MAX if self.fp8 else INT8_MAX
            scale = x.detach().abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / top
            q = x.float()  # x itself if float32: divided out of place, a copy in place
            q = torch.div(q, scale) if q is x else q.div_(scale)
            if self.fp8:
                q = q.to(torch.float8_e4m3fn).view(torch.uint8)
            else:
                q = q.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
            return Encoded(q.contiguous(), scale, owned=True)
        if self.cast is not None and x.dtype != self.cast:
            return Encoded(x.to(self.cast).contiguous(), owned=True)
        data = x.contiguous()
        return Encoded(data, owned=data is not x)

    def _codes(self, e: Encoded) -> torch.Tensor:
        """The 8-bit codes of ``e`` as float32 (a fresh tensor; fp8 on a CPU through a 256-entry
        table, which gives the same values several times faster than the cast)."""
        if self.int8:
            return e.data.float()
        if e.data.device.type != "cpu":
            return e.data.view(torch.float8_e4m3fn).float()
        if self._fp8_table is None:
            self._fp8_table = torch.arange(256, dtype=torch.uint8).view(
                torch.float8_e4m3fn).float()
        return self._fp8_table.index_select(0, e.data.reshape(-1).int()).view(e.data.shape)

    def decode(self, e: Encoded, dtype: torch.dtype) -> torch.Tensor:
        """``e`` in ``dtype``: a fresh tensor, except an unencoded store already in ``dtype``,
        which returns ``e.data`` itself."""
        if not (self.fp8 or self.int8):
            return e.data if e.data.dtype == dtype else e.data.to(dtype)
        out = self._codes(e).mul_(e.scale)
        return out if dtype == torch.float32 else out.to(dtype)

    def add_into_(self, out: torch.Tensor, e: Encoded, alpha: float) -> None:
        """``out += alpha * decode(e)`` in one pass (8-bit stores: over their float codes)."""
        if self.fp8 or self.int8:
            out.addcmul_(e.data if self.int8 else self._codes(e), e.scale, value=alpha)
        else:
            out.add_(e.data, alpha=alpha)

    def write_rows_(self, e: Encoded, rows: torch.Tensor, src: torch.Tensor) -> None:
        """Write src [k, ...] into the batch rows ``rows`` [k] of e."""
        part = self.encode(src)
        e.data.index_copy_(0, rows, part.data)
        if e.scale is not None:
            e.scale.index_copy_(0, rows, part.scale)

    def scatter_(self, e: Encoded, idx: torch.Tensor, src: torch.Tensor) -> None:
        """Write src [B, k, C] at token positions idx [B, k] of e (token layout)."""
        b, c = e.data.shape[0], e.data.shape[-1]
        part = self.encode(src)
        e.data.view(b, -1, c).scatter_(1, idx[..., None].expand(-1, -1, c), part.data)
        if e.scale is not None:
            e.scale.view(b, -1, 1).scatter_(1, idx[..., None], part.scale)


class Feature:
    """One stored module output (or the trunk output): its value at the last anchor and, with
    forecasting, its finite differences."""

    def __init__(self, codec: Codec, counter: StoredBytes, order: int = 0,
                 method: str = "taylor", corrector: Optional[str] = None):
        self.codec, self.counter, self.order = codec, counter, order
        self.method, self.corrector = method, corrector
        self.terms: List[Encoded] = []
        self.anchor: Optional[float] = None
        self.anchors: List[float] = []  # bdf2: the anchors of terms, newest first

    @property
    def shape(self):
        return self.terms[0].shape if self.terms else None

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.terms)

    def clear(self) -> None:
        self.counter.add(-self.nbytes)
        self.terms, self.anchor, self.anchors = [], None, []

    def update(self, value: torch.Tensor, at: float) -> None:
        """The module was computed at ``at``: ``value`` becomes D0 and the differences move
        (bdf2: the newest of the three kept values). ``value`` itself is kept (never written
        into); the new differences are computed into the buffers of the old ones where the store
        keeps the model's dtype (one subtraction and one division each, no other temporary)."""
        if self.method == "bdf2":
            return self._update_values(value, at)
        old, n = self.terms, 0
        if self.order and old and at != self.anchor and \
                tuple(old[0].shape) == tuple(value.shape):
            n = min(self.order, len(old))
        diffs = self._differences(value, at - self.anchor, n) if n else []
        self.clear()
        self.terms = [self.codec.encode(value)] + diffs
        self.anchor = at
        self.counter.add(self.nbytes)

    def _differences(self, value: torch.Tensor, h: float, n: int) -> List[Encoded]:
        """The first ``n`` differences at the new anchor: ``D(i+1) = (Di(new) - Di(old)) / h``
        with ``D0(new) = value`` (in ``value``'s dtype, computed in the work dtype)."""
        old, codec, work = self.terms, self.codec, _work_dtype(value.dtype)
        if value.dtype == work and codec.keeps(work) and \
                all(e.scale is None and e.data.dtype == work for e in old[:n]):
            # in place: D(i+1) goes into the buffer of Di(old) (the cache's own for i >= 1;
            # for D1, D0(old)'s if it was a copy, else the dropped top difference's)
            spare = [e.data for e in old[n:] if e.owned and e.data.dtype == work]
            prev, out = value, []
            for i in range(n):
                e = old[i]
                buf = e.data if e.owned else (spare.pop() if spare else None)
                d = torch.sub(prev, e.data) if buf is None else \
                    torch.sub(prev, e.data, out=buf)
                out.append(Encoded(d.div_(h), owned=True))
                prev = d
            return out
        prev, out = value, []
        for i in range(n):
            e = old[i]
            dec = codec.decode(e, work)
            cur = prev if prev.dtype == work else prev.to(work)
            d = torch.sub(cur, dec, out=dec) if dec is not e.data else torch.sub(cur, dec)
            d.div_(h)
            prev = d if d.dtype == value.dtype else d.to(value.dtype)
            enc = codec.encode(prev)
            enc.owned = True  # a difference the cache computed
            out.append(enc)
        return out

    def _update_values(self, value: torch.Tensor, at: float) -> None:
        keep = [] if not self.terms or tuple(self.shape) != tuple(value.shape) else \
            [(e, a) for e, a in zip(self.terms, self.anchors) if a != at][:2]
        self.clear()
        self.terms = [self.codec.encode(value)] + [e for e, _ in keep]
        self.anchors = [at] + [a for _, a in keep]
        self.anchor = at
        self.counter.add(self.nbytes)

    def bdf2_weights(self, at: float) -> List[float]:
        """The read-out at ``at`` as weights of the kept values (newest first), float64."""
        a, d = self.anchors, at - self.anchors[0]
        if len(a) == 1 or d == 0:
            return [1.0] + [0.0] * (len(a) - 1)
        h1 = a[0] - a[1]
        if len(a) == 2:  # linear extrapolation
            return [1.0 + d / h1, -d / h1]
        h2 = a[1] - a[2]
        slope = [(2 * h1 + h2) / (h1 * (h1 + h2)), -(h1 + h2) / (h1 * h2), h1 / (h2 * (h1 + h2))]
        pred = [1.0 + d * slope[0], d * slope[1], d * slope[2]]
        if self.corrector != "heun":
            return pred
        # the BDF2 slope at the predicted point, from (F1, F0, P) at (a1, a0, a0 + d)
        g1, g2 = d, h1
        c_p, c_0, c_1 = (2 * g1 + g2) / (g1 * (g1 + g2)), -(g1 + g2) / (g1 * g2), \
            g1 / (g2 * (g1 + g2))
        slope_p = [c_p * pred[0] + c_0, c_p * pred[1] + c_1, c_p * pred[2]]
        return [(1.0 if i == 0 else 0.0) + d / 2 * (slope[i] + slope_p[i]) for i in range(3)]

    def value(self, at: float, dtype: torch.dtype) -> torch.Tensor:
        """The stored value (order 0, or one anchor so far) or the forecast at ``at``: a linear
        combination of the kept terms, its weights host floats computed once per read (Taylor:
        ``d^i / i!``; bdf2: :meth:`bdf2_weights`), accumulated into one fresh output buffer.
        Order 0 returns the stored tensor itself (reuse: written-in tokens persist); with
        forecasting the result is always a fresh tensor, one anchor included, so a caller
        writing recomputed tokens into it changes neither the store nor the model's tensor."""
        if len(self.terms) == 1:
            e = self.terms[0]
            out = self.codec.decode(e, dtype)
            if out is e.data:
                if self.order:  # a forecast is the caller's to write into (one anchor too)
                    return out.clone()
                e.owned = False  # handed out as is: the caller holds it
            return out
        if self.method == "bdf2":
            weights = self.bdf2_weights(at)
        else:
            d = at - self.anchor
            weights = [1.0] + [d ** i / math.factorial(i) for i in range(1, len(self.terms))]
        return self._combine(weights, dtype)

    def _combine(self, weights: List[float], dtype: torch.dtype) -> torch.Tensor:
        """``sum_i weights[i] * term_i`` in ``dtype`` as a fresh tensor, accumulated in the work
        dtype (float32 at least; directly in ``dtype`` where that is it, or where one fused
        ``a + w b`` rounds only once); terms of weight 0 are not read."""
        codec, work = self.codec, _work_dtype(dtype)
        pairs = [(e, w) for e, w in zip(self.terms, weights) if w != 0.0 or e is self.terms[0]]
        plain = all(e.scale is None and e.data.dtype == dtype and codec.keeps(dtype)
                    for e, _ in pairs)
        acc = dtype if plain and (dtype == work or (
            len(pairs) <= 2 and pairs[0][1] == 1.0)) else work
        (e0, w0), rest = pairs[0], pairs[1:]
        if e0.scale is None and e0.data.dtype == acc:  # never written into: not ours to change
            if rest and w0 == 1.0 and rest[0][0].scale is None and rest[0][0].data.dtype == acc:
                out = torch.add(e0.data, rest[0][0].data, alpha=rest[0][1])
                rest = rest[1:]
            else:
                out = torch.mul(e0.data, w0)
        else:
            out = codec.decode(e0, acc)  # a fresh tensor (a cast or a dequantisation)
            if w0 != 1.0:
                out.mul_(w0)
        for e, w in rest:
            codec.add_into_(out, e, w)
        return out if out.dtype == dtype else out.to(dtype)

    def write_rows_(self, rows: torch.Tensor, src: torch.Tensor) -> None:
        """Replace the batch rows ``rows`` of the stored value (reuse without forecasting)."""
        self.codec.write_rows_(self.terms[0], rows, src)

    def scatter_(self, idx: torch.Tensor, src: torch.Tensor) -> None:
        """Write recomputed tokens into the stored value (reuse without forecasting only)."""
        self.codec.scatter_(self.terms[0], idx, src)


class BlockState:
    """What one block keeps: module outputs as :class:`Feature` (self-attention before its gate,
    in the layout the attention module returns; cross-attention; MLP before its gate); the token
    score of the last fully computed self-attention [B, N]; per kind, the step at which each
    token was last recomputed [B, N]; the block input at the last full MLP (similarity)."""

    FEATURES = ("attn", "cross", "mlp")
    TENSORS = ("score", "x_ref")

    def __init__(self, counter: StoredBytes, codec: Codec, order: int = 0,
                 method: str = "taylor", corrector: Optional[str] = None):
        self._counter, self._codec, self._order = counter, codec, order
        self._method = (method, corrector)
        self.attn = Feature(codec, counter, order, method, corrector)
        self.cross = Feature(codec, counter, order, method, corrector)
        self.mlp = Feature(codec, counter, order, method, corrector)
        self.more: Dict[tuple, Feature] = {}  # later calls within one forward; other names
        self.score: Optional[torch.Tensor] = None
        self.x_ref: Optional[torch.Tensor] = None
        self.last_step: Dict[str, torch.Tensor] = {}

    def feature(self, name: str, call: int = 0) -> Feature:
        """The stored output of the ``call``-th call (0-based) of module ``name`` within one
        block forward (Open-Sora 1.3's i2v blocks call cross-attention once per frame group);
        names beyond :attr:`FEATURES` (a layout's own, e.g. an MMDiT's text stream) are kept
        the same way."""
        if call == 0 and name in self.FEATURES:
            return getattr(self, name)
        key = (name, call)
        if key not in self.more:
            self.more[key] = Feature(self._codec, self._counter, self._order, *self._method)
        return self.more[key]

    def put(self, name: str, value: Optional[torch.Tensor]) -> None:
        """Keep a plain tensor (``score`` / ``x_ref``), replacing the previous one."""
        self._counter.add(_nbytes(value) - _nbytes(getattr(self, name)))
        setattr(self, name, value)

    def clear(self) -> None:
        for feature in [*(getattr(self, n) for n in self.FEATURES), *self.more.values()]:
            feature.clear()
        self.more = {}
        for name in self.TENSORS:
            self.put(name, None)
        self.last_step = {}
