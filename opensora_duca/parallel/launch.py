"""Process-group start-up of the tools: plain or under torchrun, as Open-Sora's scripts do."""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

#: seconds a collective (and the start-up rendezvous) waits for the other ranks by default
DEFAULT_TIMEOUT_S = 600.0


def init_distributed(device: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S
                     ) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) of this process.

    ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (default: CUDA when available). Under
    torchrun (``WORLD_SIZE`` > 1) the process group is initialised once with
    :func:`torch.distributed.init_process_group`, NCCL on CUDA and gloo on the CPU, its
    collectives and the start-up rendezvous failing after ``timeout_s`` seconds (colossalai's
    launcher is not used: it keeps references to the group after it is destroyed); each rank
    then uses the CUDA device of its ``LOCAL_RANK``. Release the group with
    :func:`opensora_duca.parallel.release_process_group`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, dev


__all__ = ["DEFAULT_TIMEOUT_S", "init_distributed"]
