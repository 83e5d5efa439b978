"""The registry of layout adapters: what the cache knows about one model family's blocks, one
module per family.

An adapter answers, for the model it was built on: which blocks run in which order and of which
kind (:meth:`blocks`), which submodules are tapped and what they store (``TAPPED``), how the
trunk's shape and token grid are read from a call (:meth:`trunk_shape`), where the value
vectors and attention maps are (:meth:`qkv_module`, :meth:`map_module`), the token-sparse
reused step of its block class (:meth:`sparse_step`), the input an adaptive measure reads
(:meth:`modulated_input`), and how a block's arguments are cut to a sub-batch
(:meth:`args_rows`). The manager, runner and policies name no model attribute; a new model
family is one adapter registered here plus its tests.
"""
from __future__ import annotations

from typing import Dict, List

import torch.nn as nn

LAYOUTS: Dict[str, type] = {}


def register_layout(cls: type) -> type:
    """Class decorator: make an adapter known (``cls.name``), tried in registration order."""
    LAYOUTS[cls.name] = cls
    return cls


def tapped_modules(layout, block: nn.Module) -> dict:
    """The tapped submodules of ``block`` (attribute paths -> (stored feature, kind)): the
    adapter's ``tapped(block)`` where its blocks differ, else its ``TAPPED``."""
    return layout.tapped(block) if hasattr(layout, "tapped") else layout.TAPPED


def layout_for(model: nn.Module):
    """The adapter of the first registered family whose ``matches(model)`` is True."""
    for cls in LAYOUTS.values():
        if cls.matches(model):
            return cls(model)
    needs: List[str] = [f"{name}: {cls.requirement}" for name, cls in LAYOUTS.items()]
    raise TypeError(f"apply_cache: {type(model).__name__} is of no model family the cache "
                    f"knows; accepted: {'; '.join(needs)}")
