"""The ``DuCa`` model wrapper type: ``dict(type="DuCa", model=dict(type=...), cache=dict(...))``.

Building it builds the inner model (forwarding every keyword argument the caller passes, as
Open-Sora's inference script passes ``input_size``, ``in_channels``, ``caption_channels``,
``model_max_length``, ``enable_sequence_parallelism``), attaches the cache and returns the
patched *inner* model, so ``model.y_embedder`` and every other attribute still work. The manager
is reachable with :func:`opensora_duca.cache.get_cache_manager`. (Registered in MODELS, whose
locations include this package.)
"""
from __future__ import annotations

from typing import Any, Optional

from ..registry import MODELS
from .manager import apply_cache


def build_cached(registry, model: Any, cache: Optional[dict] = None, **kwargs):
    """Build ``model`` from ``registry`` with ``kwargs`` and attach ``cache`` (default DuCa)."""
    if not isinstance(model, dict) and not hasattr(model, "to_dict"):
        raise ValueError(f"DuCa wrapper: model={model!r} is not accepted; accepted: "
                         f"dict(type=<a registered model>, ...)")
    cfg = dict(model.to_dict() if hasattr(model, "to_dict") else model)
    if "type" not in cfg:
        raise KeyError("DuCa wrapper: the inner model config has no 'type' key")
    cfg.update(kwargs)
    inner = registry.build(cfg)
    cache_cfg = dict(type="DuCa") if cache is None else cache
    if hasattr(cache_cfg, "to_dict"):
        cache_cfg = cache_cfg.to_dict()
    apply_cache(inner, cache_cfg)
    return inner


@MODELS.register_module("DuCa")
def duca_model(model: Any, cache: Optional[dict] = None, **kwargs):
    """``dict(type="DuCa", model=dict(type="STDiT3-XL/2", ...), cache=dict(type=...))``."""
    return build_cached(MODELS, model, cache, **kwargs)
