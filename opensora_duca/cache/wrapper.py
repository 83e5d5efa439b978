"""The ``DuCa`` model wrapper type: ``dict(type="DuCa", model=dict(type=...), cache=dict(...))``.

Building it builds the inner model (forwarding every keyword argument the caller passes, as
Open-Sora 1.x's inference script passes ``input_size``, ``in_channels``, ``caption_channels``,
``model_max_length``, ``enable_sequence_parallelism`` and 2.0's passes ``device_map`` and
``torch_dtype``; keys beside ``model`` in the wrapper's entry, such as the ``in_channels`` that
2.0's script reads from ``cfg.model``, are forwarded too and must agree with the inner
model's), attaches the cache and returns the patched *inner* model, so ``model.y_embedder``
and every other attribute still work. The manager is reachable with
:func:`opensora_duca.cache.get_cache_manager`. (Registered in MODELS, whose locations include
this package.)

``cache_report`` (default True): each finished sampling run logs its cache report once, on rank
0, through Python logging (logger ``opensora_duca.cache``, level INFO): one line (policy, steps,
FLOPs ratio, peak stored bytes) and the table, with the reason when no step could be cached.
``cache_report=False`` keeps the run quiet.
"""
from __future__ import annotations

from typing import Any, Optional

from ..registry import MODELS
from ..utils.config import plain
from .manager import apply_cache


def build_cached(registry, model: Any, cache: Optional[dict] = None, cache_report: bool = True,
                 **kwargs):
    """Build ``model`` from ``registry`` with ``kwargs`` and attach ``cache`` (default DuCa);
    with ``cache_report`` every finished run logs its report."""
    if not isinstance(cache_report, bool):
        raise ValueError(f"DuCa wrapper: cache_report={cache_report!r} is not accepted; "
                         f"accepted: True (log each run's cache report) or False")
    model, cache = plain(model), plain(cache)
    if not isinstance(model, dict):
        raise ValueError(f"DuCa wrapper: model={model!r} is not accepted; accepted: "
                         f"dict(type=<a registered model>, ...)")
    cfg = dict(model)
    if "type" not in cfg:
        raise KeyError("DuCa wrapper: the inner model config has no 'type' key")
    for key, value in kwargs.items():  # e.g. in_channels, which Open-Sora 2.0's script reads
        if key in cfg and not _same(cfg[key], value):
            raise ValueError(f"DuCa wrapper: {key}={value!r} (beside the inner model, or passed "
                             f"by the script) differs from the inner model's {key}="
                             f"{cfg[key]!r}; accepted: the same value in both places")
    cfg.update(kwargs)
    inner = registry.build(cfg)
    cache_cfg = dict(type="DuCa") if cache is None else cache
    apply_cache(inner, cache_cfg).log_runs = cache_report
    return inner


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors: compared by identity
        return a is b


@MODELS.register_module("DuCa")
def duca_model(model: Any, cache: Optional[dict] = None, cache_report: bool = True, **kwargs):
    """``dict(type="DuCa", model=dict(type="STDiT3-XL/2", ...), cache=dict(type=...),
    cache_report=True)``."""
    return build_cached(MODELS, model, cache, cache_report, **kwargs)
