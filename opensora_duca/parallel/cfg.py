"""Classifier-free-guidance (CFG) parallelism: the conditional and the unconditional half of the
CFG batch run on two groups of ranks, each group sequence-parallel over its own ranks.

With ``cfg_parallel=2`` the world has 2 x P ranks (P: the sequence-parallel degree). Rank ``r``
runs CFG half ``r // P`` (0: conditional, 1: unconditional) as rank ``r % P`` of that half's
sequence-parallel group, so the ranks of one sequence-parallel group, which exchange the most
data (all-to-all in every fully computed self-attention), are neighbours. Ranks ``j`` and
``P + j`` form a CFG pair: once per sampling step they exchange their halves of the model
output with one all_gather, and both compute the same guided velocity, so every rank holds the
same latents after every step.

Each process runs the model on B samples instead of 2B, so a cache attached to it keeps the
stored features of its own half and its cached steps communicate only inside its
sequence-parallel group (an aggressive step not at all). What a policy computes per sample
(token scores such as ``vnorm``, row quotas, stored features) is unchanged; what couples the two
halves is refused by :func:`check_cache_policy`. The ``random`` scorer draws its numbers for the
whole CFG batch and takes this half's rows (the pipeline sets the manager's ``batch_part``), so
every sample gets the draw of a single-process run.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import all_gather, set_sequence_parallel_group

ACCEPTED = (1, 2)


class CFGParallel:
    """This process's place in a 2 x P layout (see the module docstring) and its groups."""

    def __init__(self, rank: int, world_size: int):
        self.sp_degree = world_size // 2
        self.cfg_rank, self.sp_rank = divmod(rank, self.sp_degree)
        p = self.sp_degree
        self.sp_group = None
        for half in range(2):  # every rank creates every group, in the same order
            ranks = list(range(half * p, (half + 1) * p))
            group = dist.new_group(ranks) if p > 1 else None
            if half == self.cfg_rank:
                self.sp_group = group
        self.pair_group = None
        for j in range(p):
            group = dist.new_group([j, p + j])
            if j == self.sp_rank:
                self.pair_group = group

    def half(self, x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
        """This rank's half (conditional first) of a CFG-batch tensor of 2 x ``batch`` rows."""
        if x.shape[0] != 2 * batch:
            raise ValueError(f"{name}: {x.shape[0]} rows; accepted with cfg_parallel=2: the "
                             f"batch size {batch} or the CFG batch size {2 * batch}")
        return x[self.cfg_rank * batch:(self.cfg_rank + 1) * batch]

    def combine(self, v: torch.Tensor) -> torch.Tensor:
        """[B, ...] of this half -> [2B, ...] (conditional, unconditional): one all_gather."""
        return all_gather(v, self.pair_group, dim=0)

    def describe(self) -> str:
        return f"CFG parallel: 2 groups of {self.sp_degree} rank(s)"


def check_degree(cfg_parallel) -> int:
    """The config value ``cfg_parallel`` (None means 1), checked."""
    value = 1 if cfg_parallel is None else cfg_parallel
    if isinstance(value, bool) or value not in ACCEPTED:
        raise ValueError(f"cfg_parallel={cfg_parallel!r} is not accepted; accepted: 1 (off) or 2 "
                         f"(conditional and unconditional halves on two groups of ranks)")
    return int(value)


def check_world(degree: int, world: int) -> None:
    """Refuse a world size the CFG degree does not divide."""
    if world % degree:
        raise ValueError(f"cfg_parallel={degree} needs a world size divisible by {degree}; this "
                         f"run has {world} rank(s) (start {degree} x P ranks, e.g. torchrun "
                         f"--nproc_per_node {degree})")


def setup_cfg_parallel(cfg_parallel) -> Optional[CFGParallel]:
    """None for ``cfg_parallel=1``. For 2: create the groups (collectively: every rank calls
    this), make this rank's half group the sequence-parallel group of the process, and return
    the :class:`CFGParallel` the sampler takes."""
    if check_degree(cfg_parallel) == 1:
        return None
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    check_world(2, world)
    layout = CFGParallel(dist.get_rank(), world)
    set_sequence_parallel_group(layout.sp_group)
    return layout


def check_cache_policy(policy) -> None:
    """Refuse a cache policy that couples the two halves of the CFG batch (its
    ``couples_cfg_halves`` is True: it would need communication between the CFG groups inside
    the model)."""
    if not getattr(policy, "couples_cfg_halves", False):
        return
    if getattr(policy, "cfg_shared_selection", False):
        raise ValueError("cache cfg_shared_selection=True is not accepted with cfg_parallel=2 "
                         "(each CFG group holds one half of the batch); accepted: False, or "
                         "cfg_parallel=1")
    raise ValueError(f"cache type={policy.name!r} is not accepted with cfg_parallel=2 (its "
                     f"change measure sums over the whole CFG batch); accepted: a fixed-plan "
                     f"policy (none, DuCa, ToCa, FORA, PAB, TrunkReuse, TaylorSeer, MagCache) "
                     f"or cfg_parallel=1")


__all__ = ["CFGParallel", "check_degree", "check_world", "setup_cfg_parallel",
           "check_cache_policy"]
