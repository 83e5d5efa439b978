"""Use DuCa inside an existing Open-Sora run, without editing Open-Sora.

Add to the run's config::

    custom_imports = dict(imports=["opensora_duca.opensora_plugin"], allow_failed_imports=False)
    model = dict(type="DuCa",
                 model=dict(type="STDiT3-XL/2", from_pretrained="hpcai-tech/OpenSora-STDiT-v3",
                            qk_norm=True, enable_flash_attn=True, enable_layernorm_kernel=True),
                 cache=dict(type="DuCa"))

Importing this module registers the ``DuCa`` wrapper into Open-Sora's MODELS registry
(``opensora.registry.MODELS``); Open-Sora's script then builds it with its usual keyword
arguments, which are forwarded to the inner model, and gets back the patched inner STDiT3.
Steps are tracked from the timesteps the sampler passes (a timestep that does not decrease
starts a new run), so no script change is needed; upstream's frame-conditioned, i2v / v2v and
SDEdit loops are recognised as one run. Each finished run logs its cache report (rank 0,
logger ``opensora_duca.cache``); ``cache_report=False`` in the ``DuCa`` entry keeps it quiet.
"""
from __future__ import annotations

try:
    from opensora.registry import MODELS as OPENSORA_MODELS
except ImportError as err:  # pragma: no cover - exercised by tests with a missing package
    raise ImportError(
        "opensora_duca.opensora_plugin plugs DuCa into an Open-Sora run and needs Open-Sora "
        "installed (the 'opensora' package, https://github.com/hpcaitech/Open-Sora, v1.2); "
        f"it could not be imported ({err}). Without Open-Sora, use this project's own tools with "
        "a top-level `cache = dict(type=\"DuCa\")` in the config.") from err

from .cache.wrapper import build_cached  # also registers our own "DuCa" wrapper type


def _duca_for_opensora(model, cache=None, cache_report=True, **kwargs):
    """Open-Sora MODELS entry ``DuCa``: build ``model`` through Open-Sora's registry with the
    script's keyword arguments, attach ``cache`` and return the patched inner model; each
    finished run logs its cache report (``cache_report=False``: quiet)."""
    return build_cached(OPENSORA_MODELS, model, cache, cache_report, **kwargs)


if "DuCa" not in OPENSORA_MODELS.module_dict:
    OPENSORA_MODELS.register_module(name="DuCa", module=_duca_for_opensora)
