"""Check that every rank runs with the same settings (one small collective).

Ranks that disagree on a seed, the prompts, the video size, the step count or the cache policy
(a config that reads ``RANK``, say) would otherwise produce one silently mixed video. Each rank
hashes the canonical JSON of every setting (sha256, first 8 bytes as an int64), the ranks
all-gather the ``[K]`` int64 vector, and every rank compares the columns: all of them see the
same table, so all of them fail together, naming the settings that differ.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist

from ..utils.config import plain


def _canonical(value: Any) -> str:
    return json.dumps(plain(value), sort_keys=True, separators=(",", ":"), default=repr)


def setting_digests(settings: dict) -> torch.Tensor:
    """``[len(settings)]`` int64: a sha256 prefix of each setting, in sorted key order."""
    out = []
    for key in sorted(settings):
        digest = hashlib.sha256(f"{key}={_canonical(settings[key])}".encode()).digest()
        out.append(int.from_bytes(digest[:8], "little", signed=True))
    return torch.tensor(out, dtype=torch.int64)


def differing_settings(settings: dict, group=None) -> list[str]:
    """The keys of ``settings`` whose values are not the same on every rank of ``group``
    (WORLD by default); ``[]`` without an initialised multi-rank group. Collective: every
    rank must call it with the same keys."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return []
    local = setting_digests(settings)
    if dist.get_backend(group) == "nccl":
        local = local.to(torch.device("cuda", torch.cuda.current_device()))
    table = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, local, group=group)
    same = torch.stack(table).eq(local[None]).all(0).cpu()
    return [key for key, ok in zip(sorted(settings), same.tolist()) if not ok]


def check_ranks_agree(settings: dict, group=None) -> None:
    """Raise ValueError (on every rank) when some setting differs between ranks."""
    diff = differing_settings(settings, group)
    if diff:
        rank = dist.get_rank(group)
        mine = ", ".join(f"{k}={_canonical(settings[k])[:80]}" for k in diff)
        raise ValueError(f"the ranks run with different settings for {diff} (rank {rank} has "
                         f"{mine}); accepted: the same settings on every rank — a config must "
                         "not depend on RANK or LOCAL_RANK")


__all__ = ["check_ranks_agree", "differing_settings", "setting_digests"]
