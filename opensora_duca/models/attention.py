"""Attention backends: ``auto | flash | xformers | sdpa | math``.

All functions take ``q, k, v`` laid out ``[B, heads, N, head_dim]`` and return the same layout.
``math`` is the explicit softmax(q k^T) v with an fp32 softmax; it is the only backend that can
hand back the attention map (needed by the ``attention`` token scorer). ``flash`` and
``xformers`` are optional packages, detected at run time; ``auto`` picks flash-attn (CUDA,
fp16/bf16), then torch's fused ``scaled_dot_product_attention``.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "xformers", "sdpa", "math")


def _has(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


def available_backends() -> list[str]:
    """Backends usable in this process (``sdpa`` and ``math`` always are)."""
    out = ["sdpa", "math"]
    if _has("flash_attn") and torch.cuda.is_available():
        out.insert(0, "flash")
    if _has("xformers") and torch.cuda.is_available():
        out.insert(0, "xformers")
    return out


def check_backend(name: str) -> str:
    """Validate a configured backend name; asking for a missing optional one is an error."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; accepted: {list(BACKENDS)}")
    if name in ("flash", "xformers") and name not in available_backends():
        pkg = "flash_attn" if name == "flash" else "xformers"
        raise RuntimeError(f"attention backend {name!r} needs the {pkg!r} package and a CUDA "
                           f"device; available here: {available_backends()} (use 'auto' to "
                           f"fall back)")
    return name


def resolve_backend(name: str, q: torch.Tensor) -> str:
    """Turn ``auto`` into a concrete backend for this tensor."""
    if name != "auto":
        return name
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _has("flash_attn"):
        return "flash"
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              key_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
              return_map: bool = False):
    """softmax(q k^T * scale [masked]) v.

    Args:
        q, k, v: ``[B, h, Nq, d]``, ``[B, h, Nk, d]``, ``[B, h, Nk, d]``.
        key_mask: optional bool ``[B, Nk]``, True = the key takes part.
        return_map: also return the ``[B, h, Nq, Nk]`` attention map (``math`` only).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = resolve_backend(backend, q)
    if return_map and backend != "math":
        raise ValueError(f"attention maps need the 'math' backend, not {backend!r}")
    if backend == "math":
        attn = (q.float() @ k.float().transpose(-2, -1)) * scale
        if key_mask is not None:
            attn = attn.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        attn = attn.softmax(dim=-1)
        out = (attn.to(v.dtype) @ v)
        return (out, attn) if return_map else out
    if backend == "flash" and key_mask is None:
        from flash_attn import flash_attn_func
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              softmax_scale=scale)
        return out.transpose(1, 2)
    if backend == "xformers":
        import xformers.ops as xops
        bias = None
        if key_mask is not None:
            bias = torch.zeros(key_mask.shape[0], 1, q.shape[2], key_mask.shape[1],
                               dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            bias = bias.expand(-1, q.shape[1], -1, -1)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), attn_bias=bias, scale=scale)
        return out.transpose(1, 2)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
