"""Run a function on P CPU ranks (gloo) from a test, and collect what each rank returns.

::

    from dist_utils import run_distributed

    def worker(rank, world_size, arg):          # module level, so spawn can pickle it
        ...                                      # torch.distributed is initialised (gloo)
        return {"out": tensor}                   # anything torch.save can write

    results = run_distributed(worker, 2, arg)    # [result of rank 0, result of rank 1]

Each worker process: ``torch.set_num_threads(1)``, ``dist.init_process_group("gloo")`` on
127.0.0.1 with a free port, then ``fn(rank, world_size, *args)``. Afterwards what ``fn`` left
(models in reference cycles, e.g. with a cache attached) is collected and only then is the
process group destroyed, so no gloo worker thread outlives it (that aborted the process at
exit now and then). A failure in any rank raises in the caller with that rank's traceback.
``world_size=1`` still runs in a child process with an initialised group of one rank (use
the function directly for a plain single-process run).
"""
from __future__ import annotations

import collections
import contextlib
import os
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from opensora_duca.parallel import release_process_group


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, outdir: str, fn: Callable, args: tuple,
            kwargs: dict) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    failed = False
    try:
        torch.save(fn(rank, world_size, *args, **kwargs), os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        failed = True
    release_process_group()  # here, not in the except block: its traceback holds fn's frames
    if failed:
        raise SystemExit(1)


def run_distributed(fn: Callable, world_size: int, *args: Any, **kwargs: Any) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned gloo ranks and
    return the list of per-rank results. They are loaded with ``torch.load(weights_only=True)``:
    tensors, numbers, strings, None and lists / tuples / dicts (and ``collections.Counter``) of
    them, nothing that runs code when read."""
    with tempfile.TemporaryDirectory(prefix="dist_utils_") as outdir:
        port = free_port()
        try:
            mp.spawn(_worker, args=(world_size, port, outdir, fn, args, kwargs),
                     nprocs=world_size, join=True)
        except Exception as err:
            msgs = []
            for r in range(world_size):
                path = os.path.join(outdir, f"rank{r}.err")
                if os.path.exists(path):
                    with open(path) as f:
                        msgs.append(f"--- rank {r} ---\n{f.read()}")
            raise RuntimeError(f"distributed run of {getattr(fn, '__name__', fn)} on "
                               f"{world_size} ranks failed:\n" + "\n".join(msgs)) from err
        with _safe_result_types():
            return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=True)
                    for r in range(world_size)]


def _safe_result_types():
    """Allow ``collections.Counter`` (collective counts) in the weights-only loader."""
    allow = getattr(torch.serialization, "safe_globals", None)
    return allow([collections.Counter]) if allow is not None else contextlib.nullcontext()


COLLECTIVES = ("all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor",
               "all_reduce", "broadcast", "reduce_scatter", "send", "recv", "barrier")


@contextlib.contextmanager
def observe_collectives(on_call: Callable[[str, dict], None], names=COLLECTIVES):
    """Inside the ``with`` block every call of a ``torch.distributed`` collective in ``names``
    first calls ``on_call(name, kwargs)``; the functions are restored afterwards."""
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def wrap(name, fn):
        def inner(*a, **k):
            on_call(name, k)
            return fn(*a, **k)
        return inner

    for n, fn in originals.items():
        setattr(dist, n, wrap(n, fn))
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)
