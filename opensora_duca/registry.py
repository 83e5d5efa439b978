"""mmengine registries of the package and the one helper that builds from them.

Every buildable thing (models, samplers, cache policies, text encoders, latent codecs,
datasets) is registered here by ``type`` name, so plain-Python mmengine configs select them
with ``dict(type=..., **kwargs)`` exactly as Open-Sora's configs do.
"""
from __future__ import annotations

import copy
from typing import Any

from mmengine.registry import Registry

from .utils.config import plain

MODELS = Registry("model", scope="opensora_duca",
                  locations=["opensora_duca.models", "opensora_duca.cache"])
SCHEDULERS = Registry("scheduler", scope="opensora_duca", locations=["opensora_duca.schedulers"])
CACHES = Registry("cache", scope="opensora_duca", locations=["opensora_duca.cache"])
TEXT_ENCODERS = Registry("text_encoder", scope="opensora_duca", locations=["opensora_duca.models"])
VAES = Registry("vae", scope="opensora_duca", locations=["opensora_duca.models"])
DATASETS = Registry("dataset", scope="opensora_duca", locations=["opensora_duca.data"])

def registered(registry: Registry) -> list[str]:
    """Sorted names registered in ``registry`` (imports its modules first)."""
    registry.import_from_location()
    return sorted(registry.module_dict)


def build_module(cfg: Any, registry: Registry, **overrides: Any) -> Any:
    """Build ``cfg`` (a ``dict(type=...)``, an already built object, or None) from ``registry``.

    ``overrides`` are merged into the config (they win), mirroring Open-Sora's helper of the
    same name. An unknown ``type`` raises a KeyError that lists the registered names.
    """
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        cfg = plain(cfg)  # an mmengine ConfigDict -> dict
        if not isinstance(cfg, dict):
            return cfg  # already an object
    cfg = copy.deepcopy(dict(cfg))
    if "type" not in cfg:
        raise KeyError(f"{registry.name} config {cfg!r} has no 'type' key; registered types: "
                       f"{registered(registry)}")
    cfg.update(overrides)
    typ = cfg["type"]
    if not isinstance(typ, str):
        return registry.build(cfg)
    names = registered(registry)
    if typ not in names:
        raise KeyError(f"unknown {registry.name} type {typ!r}; registered types: {names}")
    return registry.build(cfg)
