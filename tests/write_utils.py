"""Writer processes for the atomic-write tests (real processes, not threads)."""
from __future__ import annotations

import subprocess
import sys

_DIE_WHILE_WRITING = """
import os, sys
from opensora_duca.utils.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(sys.stdin.buffer.read())
    print(tmp, flush=True)
    os._exit(0)  # dies before the rename, as a killed process would
"""

_HOLD_WHILE_WRITING = """
import sys, time
from opensora_duca.utils.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    print(tmp, flush=True)
    time.sleep(600)
"""


def dead_writer_temp(path: str, data: bytes = b"half a file") -> str:
    """The temporary file a writer of ``path`` left behind when it died mid-write."""
    res = subprocess.run([sys.executable, "-c", _DIE_WHILE_WRITING, path], input=data,
                         capture_output=True, check=True, timeout=60)
    return res.stdout.decode().strip()


def live_writer(path: str) -> tuple[subprocess.Popen, str]:
    """A running process in the middle of writing ``path``, and its temporary file (the caller
    kills the process)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_WHILE_WRITING, path],
                            stdout=subprocess.PIPE)
    return proc, proc.stdout.readline().decode().strip()
