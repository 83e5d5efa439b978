"""The ``compile`` option: torch.compile applied to the per-block work (see docs/speed.md).

A config's top-level ``compile = dict(mode="default")`` (or ``--compile`` on the command line)
turns it on. Only the *regions* are compiled — a block's own forward, the token-sparse
conservative step — never the cache's Python control flow, so a region sees the same static
shapes at every step of a kind and is compiled once per step kind and block type.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .config import plain

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: compiled graphs kept per code object; the block forward has one per step kind and block type
#: (and input shape), so torch's default of 8 is raised to this when compiling
CACHE_SIZE_LIMIT = 64


@dataclass(frozen=True)
class CompileOptions:
    """``mode``: torch.compile's mode; ``backend``: its backend (``inductor``, or e.g.
    ``aot_eager`` where no C++ compiler exists); ``fullgraph``: a graph break inside a region
    is an error (the tests run with True)."""

    mode: str = "default"
    backend: str = "inductor"
    fullgraph: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"compile mode={self.mode!r} is not accepted; accepted: "
                             f"{list(MODES)}")
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"compile backend={self.backend!r} is not accepted; accepted: a "
                             f"torch.compile backend name such as 'inductor' or 'aot_eager'")
        if not isinstance(self.fullgraph, bool):
            raise ValueError(f"compile fullgraph={self.fullgraph!r} is not accepted; accepted: "
                             f"True or False")


def compile_options(cfg: Any) -> Optional[CompileOptions]:
    """Options from a config value: None / False (off), True (defaults), a dict of
    :class:`CompileOptions` fields, or options."""
    if cfg is None or cfg is False:
        return None
    if cfg is True:
        return CompileOptions()
    if isinstance(cfg, CompileOptions):
        return cfg
    cfg = plain(cfg)
    if not isinstance(cfg, dict):
        raise ValueError(f"config key 'compile'={cfg!r} is not accepted; accepted: None, True or "
                         f"dict(mode=..., backend=..., fullgraph=...)")
    fields = set(CompileOptions.__dataclass_fields__)
    for k in cfg:
        if k not in fields:
            raise ValueError(f"config key 'compile.{k}'={cfg[k]!r} is not accepted; accepted "
                             f"keys: {sorted(fields)}")
    return CompileOptions(**cfg)


def _cxx_compiler() -> Optional[str]:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def check_available(opts: CompileOptions, device: torch.device) -> None:
    """A clear error where torch.compile cannot run: torch without it, or inductor on a CPU
    without a C++ compiler."""
    if not hasattr(torch, "compile"):
        raise RuntimeError(f"compile={opts}: this torch ({torch.__version__}) has no "
                           f"torch.compile (needs torch >= 2.0; this project supports >= 2.3)")
    if opts.backend == "inductor" and device.type == "cpu" and _cxx_compiler() is None:
        raise RuntimeError("compile: torch.compile's inductor backend needs a C++ compiler on a "
                           "CPU and none was found (CXX, g++, clang++, c++); install one, or "
                           "use compile=dict(backend='aot_eager'), or run without --compile")


def compile_region(fn: Callable, opts: CompileOptions) -> Callable:
    """``fn`` compiled with static shapes (each step kind has its own fixed shapes)."""
    import torch._dynamo.config as dynamo_config

    if dynamo_config.cache_size_limit < CACHE_SIZE_LIMIT:
        dynamo_config.cache_size_limit = CACHE_SIZE_LIMIT
    return torch.compile(fn, mode=opts.mode, backend=opts.backend, fullgraph=opts.fullgraph,
                         dynamic=False)


def compiled_graphs() -> int:
    """Graphs compiled so far in this process (torch._dynamo's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
