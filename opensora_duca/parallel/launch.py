"""Process-group start-up of the tools: plain or under torchrun, as Open-Sora's scripts do."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist


def init_distributed(device: Optional[str] = None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) of this process.

    ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (default: CUDA when available). Under
    torchrun (``WORLD_SIZE`` > 1) the process group is initialised once, with NCCL on CUDA and
    gloo on the CPU, through colossalai's launcher when colossalai is installed (as Open-Sora
    does), else through :func:`torch.distributed.init_process_group`; each rank then uses the
    CUDA device of its ``LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        try:
            import colossalai
        except ImportError:
            colossalai = None
        backend = "nccl" if use_cuda else "gloo"
        if colossalai is not None:
            try:
                colossalai.launch_from_torch(backend=backend)
            except TypeError:  # colossalai 0.3.x takes a config dict first
                colossalai.launch_from_torch({}, backend=backend)
        else:
            dist.init_process_group(backend=backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, dev


__all__ = ["init_distributed"]
