"""Sequence-parallel group and the collectives STDiT3 needs (torch.distributed).

Tokens are sharded along the spatial axis S in whole latent rows. The group is, in order of
preference: one set with :func:`set_sequence_parallel_group`; the group upstream Open-Sora
(``opensora.acceleration.parallel_states``) already registered in this process; WORLD when
torch.distributed is initialised with more than one rank; otherwise None (single process).

Shutdown: :func:`release_process_group` instead of a bare ``destroy_process_group()``. A gloo
group that some Python object still references after it was destroyed is freed later, at
interpreter exit or by a garbage-collection pass on another thread, and its worker threads
then abort the process ("terminate called without an active exception").
"""
from __future__ import annotations

import gc
import sys

import torch
import torch.distributed as dist

_GROUP = None
_GROUP_SET = False


def set_sequence_parallel_group(group) -> None:
    """Use ``group`` (a ProcessGroup, or None to force single-process) from now on."""
    global _GROUP, _GROUP_SET
    _GROUP, _GROUP_SET = group, True


def reset_sequence_parallel_group() -> None:
    global _GROUP, _GROUP_SET
    _GROUP, _GROUP_SET = None, False


def release_process_group() -> None:
    """Drop this module's group, collect reference cycles (e.g. a model with a cache attached)
    so nothing unreachable still holds a group, then destroy the default process group (when
    one is initialised). Call it after the models are out of scope."""
    reset_sequence_parallel_group()
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _upstream_group():
    mod = sys.modules.get("opensora.acceleration.parallel_states")
    if mod is None:
        return None
    getter = getattr(mod, "get_sequence_parallel_group", None)
    try:
        return getter() if getter is not None else None
    except Exception:  # upstream raises/KeyErrors when it never set one
        return None


def get_sequence_parallel_group():
    if _GROUP_SET:
        return _GROUP
    up = _upstream_group()
    if up is not None:
        return up
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def global_rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into P chunks along ``scatter_dim``, send chunk r to rank r, and concatenate
    what arrives along ``gather_dim`` (in rank order)."""
    p = group_size(group)
    if p == 1:
        return x
    chunks = [c.contiguous() for c in x.chunk(p, dim=scatter_dim)]
    inp = torch.stack(chunks, 0).contiguous()
    out = torch.empty_like(inp)
    dist.all_to_all_single(out, inp, group=group)
    return torch.cat(out.unbind(0), dim=gather_dim)


def all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    p = group_size(group)
    if p == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(p)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def rows_per_rank(h: int, p: int) -> int:
    """Latent rows each rank holds when H rows are split over P ranks (H padded up)."""
    return -(-h // p)


def split_rows(x: torch.Tensor, group, h: int, w: int) -> torch.Tensor:
    """[B, T, H*W, C] -> this rank's rows [B, T, Hl*W, C], padding H with zero rows to P*Hl."""
    p = group_size(group)
    if p == 1:
        return x
    b, t, s, c = x.shape
    hl = rows_per_rank(h, p)
    x = x.view(b, t, h, w, c)
    if hl * p != h:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, hl * p - h))
    r = group_rank(group)
    return x[:, :, r * hl:(r + 1) * hl].reshape(b, t, hl * w, c)


def gather_rows(x: torch.Tensor, group, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`split_rows`: [B, T, Hl*W, C] -> [B, T, H*W, C] (padding dropped)."""
    p = group_size(group)
    if p == 1:
        return x
    b, t, sl, c = x.shape
    full = all_gather(x, group, dim=2)
    return full[:, :, : h * w]
