"""Where one uncached model call spends its time, by kind of work (``benchmark --profile``).

One full step (every block computed) of the bench's model is run under ``torch.profiler``; each
operator called from Python is put in one class with its whole time (device time on CUDA, CPU
time on a CPU), the work it calls inside included (so the bias copy inside ``addmm`` counts as
matmul work):

* ``matmul``: linear layers and convolutions (addmm, mm, bmm, baddbmm, convolution, ...);
* ``attention``: fused attention kernels (scaled_dot_product_*, flash / efficient attention);
* ``norm``: LayerNorm / RMSNorm kernels;
* ``activation``: GELU / SiLU;
* ``elementwise``: point-wise arithmetic (modulation, gating, residual adds, rotary, casts'
  arithmetic, RMSNorm written out as pow / mean / rsqrt / mul, ...);
* ``copy``: data movement without arithmetic (copy_, clone, cat, stack, flip, gather, ...);
* ``other``: the rest (allocation, reductions outside norms, ...).

``elementwise + copy + norm`` is the share the issue's "lean base step" is about: work that is
not a matrix product, attention or the model's activation function. Operator *calls* are counted
too (operators called from Python that do work): on a GPU each is at least one kernel launch,
so the count is the eager launch overhead.
"""
from __future__ import annotations

import time
from typing import Callable, Dict

import torch

MATMUL = ("linear", "addmm", "mm", "bmm", "baddbmm", "matmul", "conv3d", "conv2d",
          "convolution", "_convolution", "mkldnn_convolution", "cudnn_convolution",
          "_addmm_activation", "addbmm", "_mm", "einsum")
ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "_flash_attention",
             "_efficient_attention", "cudnn_attention")
NORM = ("native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm", "group_norm",
        "native_group_norm")
ACTIVATION = ("gelu", "silu", "gelu_", "silu_")
COPY = ("copy_", "clone", "cat", "stack", "flip", "gather", "scatter", "scatter_", "index",
        "index_select", "repeat", "repeat_interleave", "contiguous", "_to_copy",
        "constant_pad_nd", "pad", "roll", "masked_scatter", "index_put_", "to", "type_as",
        "reshape")
ELEMENTWISE = ("add", "add_", "sub", "mul", "mul_", "div", "div_", "addcmul", "addcmul_", "pow",
               "rsqrt", "sqrt", "neg", "cos", "sin", "exp", "tanh", "where", "masked_fill",
               "clamp", "abs", "reciprocal", "sigmoid", "fill_", "lerp", "addcdiv", "sign")
# view-like operators: no kernel, no time worth a class
_VIEWS = ("view", "_reshape_alias", "as_strided", "transpose", "permute", "unsqueeze",
          "squeeze", "expand", "slice", "select", "t", "unbind", "split", "chunk", "narrow",
          "alias", "detach", "unflatten", "flatten", "empty", "empty_like", "empty_strided",
          "_unsafe_view", "split_with_sizes", "resolve_conj", "resolve_neg", "lift_fresh",
          "dropout", "result_type", "_has_compatible_shallow_copy_type",
          "is_nonzero", "item", "_local_scalar_dense", "size", "stride", "numel", "dim")
# copy-class composites that are often views or no-ops
_MAYBE_COPY = ("aten::reshape", "aten::to", "aten::type_as", "aten::contiguous")
CLASSES = ("matmul", "attention", "norm", "activation", "elementwise", "copy", "other")


def classify(op: str) -> str:
    """The class of an aten operator name (``aten::addmm`` or ``addmm``); "" for views."""
    name = op.split("::", 1)[-1]
    if name in _VIEWS:
        return ""
    if name in MATMUL:
        return "matmul"
    if any(name.startswith(a) or a in name for a in ATTENTION):
        return "attention"
    if name in NORM:
        return "norm"
    if name in ACTIVATION:
        return "activation"
    if name in COPY:
        return "copy"
    if name in ELEMENTWISE:
        return "elementwise"
    return "other"


def _total_time_us(event, cuda: bool) -> float:
    """An operator's time with its children's: device time on CUDA, CPU time otherwise."""
    if cuda:
        for attr in ("device_time_total", "cuda_time_total"):
            if hasattr(event, attr):
                return float(getattr(event, attr))
        return 0.0
    return float(event.cpu_time_total)


def profile_call(call: Callable[[], object], device: torch.device, repeat: int = 3) -> Dict:
    """Profile ``call()`` (one model call) once after ``repeat`` timed untraced calls.

    Returns ``step_s`` (median of the timed calls), ``by_class`` (class -> ``ms``, ``share``
    of the profiled self time, ``calls``), ``lean_share`` (elementwise + copy + norm),
    ``calls`` (operator calls that do work) and ``top`` (the ten costliest operators)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    times = []
    with torch.no_grad():
        call()  # warm-up (allocator, kernels' first use)
        for _ in range(max(1, repeat)):
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - t0)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            call()
            sync()
    by_class = {c: dict(ms=0.0, calls=0) for c in CLASSES}
    per_op: Dict[str, list] = {}
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("aten::"):
                nested = True
                break
            parent = parent.cpu_parent
        if nested:
            continue
        # a top-level operator: its whole time, children included (addmm's bias copy is
        # matmul work, a cast's copy is a cast), goes to its class
        ms = _total_time_us(e, cuda) / 1e3
        cls = classify(e.name)
        if not cls:
            continue
        if cls == "copy" and e.name in _MAYBE_COPY and not any(
                c.name in ("aten::copy_", "aten::clone", "aten::_to_copy")
                for c in e.cpu_children):
            continue  # a reshape / to / contiguous that copied nothing
        by_class[cls]["ms"] += ms
        by_class[cls]["calls"] += 1
        acc = per_op.setdefault(e.name, [0.0, cls, 0])
        acc[0] += ms
        acc[2] += 1
    ops = sorted(((ms, k, c, n) for k, (ms, c, n) in per_op.items()), reverse=True)
    total = sum(v["ms"] for v in by_class.values()) or 1.0
    for v in by_class.values():
        v["share"] = v["ms"] / total
    times.sort()
    return dict(step_s=times[len(times) // 2], profiled_ms=total,
                time_source="device time" if cuda else "CPU time",
                by_class=by_class,
                lean_share=sum(by_class[c]["share"] for c in ("elementwise", "copy", "norm")),
                calls=sum(v["calls"] for v in by_class.values()),
                top=[dict(op=k, cls=c, ms=ms, calls=n) for ms, k, c, n in ops[:10]])


def profile_table(prof: Dict) -> str:
    """Markdown table of :func:`profile_call`'s result."""
    lines = [f"one full step: {prof['step_s'] * 1e3:.1f} ms (median), profiled "
             f"{prof['profiled_ms']:.1f} ms of {prof['time_source']}, {prof['calls']} operator "
             f"calls from Python; element-wise + copy + norm: {prof['lean_share'] * 100:.1f}%",
             "", "| class | ms | share | calls |", "|---|---:|---:|---:|"]
    for c in CLASSES:
        v = prof["by_class"][c]
        lines.append(f"| {c} | {v['ms']:.1f} | {v['share'] * 100:.1f}% | {v['calls']} |")
    return "\n".join(lines)


class _Captured(Exception):
    pass


def first_model_call(bench) -> Callable[[], object]:
    """A zero-argument function repeating the sampler's first model call of ``bench`` (the
    CFG batch exactly as the sampler builds it), without running the rest of the sampling."""
    seen = {}

    def grab(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Captured

    handle = bench.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        bench.sample()
    except _Captured:
        pass
    finally:
        handle.remove()
    if "args" not in seen:  # pragma: no cover - a sampler that never calls the model
        raise RuntimeError("the sampler made no model call to profile")
    args, kwargs = seen["args"], seen["kwargs"]
    return lambda: bench.model(*args, **kwargs)


def count_ops(call: Callable[[], object], min_numel: int = 1) -> Dict[str, Dict[str, int]]:
    """Operators that ``call()`` runs, by class (:func:`classify`), counting only those whose
    first output has at least ``min_numel`` elements (e.g. a block's token count x channels,
    to leave out the small modulation vectors). Device independent: on a GPU in eager mode each
    counted operator is at least one kernel launch over a full-size tensor. Returns class ->
    ``calls`` and ``bytes`` (bytes written by those outputs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {c: dict(calls=0, bytes=0) for c in CLASSES}

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            cls = classify(func.overloadpacket.__name__)
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            if cls and isinstance(first, torch.Tensor) and first.numel() >= min_numel:
                counts[cls]["calls"] += 1
                counts[cls]["bytes"] += first.numel() * first.element_size()
            return out

    with torch.no_grad(), _Mode():
        call()
    return counts
