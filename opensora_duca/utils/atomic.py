"""Atomic file writes: the one way the package and its tools write an output file.

A writer gets a temporary path of its own in the target's folder, named
``.{name}.{pid}-{host}.{random}.partial``: hidden, unique per call (the random part is drawn
until the name is free, and the file is created exclusively), and naming the process that owns
it. When the writer returns, the file is flushed to disk (fsync) and renamed onto the target
with :func:`os.replace`, which is atomic within a folder. A reader therefore sees either the
previous file or a complete new one. When several processes write the same target at once,
each writes its own temporary file and the last rename wins: the target is always one
writer's complete output. If the writer fails (or is interrupted), only its own temporary file
is removed and the exception propagates.

:func:`remove_stale_temps` removes the temporary files of a target left behind by processes
that no longer run (same host, pid gone); files of live processes, of other hosts and files
whose owner cannot be read are never touched.

:func:`exclusive_lock` lets one process at a time own an output that it updates in several
writes (a sweep's JSON): a second process is refused at once with :class:`LockedError`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
from typing import Any, Callable, Iterator, Optional

TEMP_SUFFIX = ".partial"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def is_temp_name(name: str) -> bool:
    """True for temporary files of this module (never treat them as finished outputs)."""
    base = os.path.basename(name)
    return base.startswith(".") and base.endswith(TEMP_SUFFIX)


def _temp_prefix(path: str) -> str:
    return "." + os.path.basename(os.path.abspath(path)) + "."


def _create_temp(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    stem = f"{_temp_prefix(path)}{os.getpid()}-{_host()}."
    while True:
        tmp = os.path.join(folder, stem + secrets.token_hex(6) + TEMP_SUFFIX)
        try:  # exclusive create, permissions from the umask (as open(path, "w") would give)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # some platforms and file systems cannot open a folder: best effort
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a fresh temporary path beside ``path``; on a normal exit move it onto ``path``
    (fsync, then :func:`os.replace`); on any exception remove it and re-raise.

    The folder of ``path`` is created when missing. The writer may replace the temporary file
    (write it by path), but must write it under the yielded name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _create_temp(path)
    mode = os.stat(tmp).st_mode & 0o7777  # from the umask, as open(path, "w") would give
    try:
        yield tmp
        if os.stat(tmp).st_mode & 0o7777 != mode:  # a writer that replaced the file (e.g.
            os.chmod(tmp, mode)  # safetensors' 0600 file) still gives the umask's mode
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync(folder, directory=True)


def atomic_write(path: str, write: Callable[[str], Any]) -> str:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def write_bytes(path: str, data: bytes) -> str:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, write)


def write_text(path: str, text: str) -> str:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


def write_json(path: str, obj: Any, indent: Optional[int] = 2) -> str:
    """``obj`` as JSON (``json.dumps`` with ``indent``) at ``path``, atomically."""
    return write_text(path, json.dumps(obj, indent=indent))


def save_torch(path: str, obj: Any) -> str:
    """``torch.save(obj)`` at ``path``, atomically. The bytes depend on ``obj`` only: the
    archive is built in memory (saved to a file, torch names the zip's records after the file,
    here the random temporary name), so identical objects give identical files."""
    import io

    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def save_figure(path: str, fig: Any, **kwargs: Any) -> str:
    """A matplotlib figure at ``path``, atomically; the format comes from ``path``'s suffix."""
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def check_writable(path: str, key: str, folder: bool = False) -> str:
    """Before any work: ``path`` (a file, or with ``folder`` a folder) can be written -- its
    folder exists and is writable or can be created, and the name fits the file system.
    Raises a one-line ``ValueError`` naming ``key``; returns ``path``."""
    shown = path if len(str(path)) <= 120 else str(path)[:120] + "..."
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError(f"{key}={shown!r} is not accepted; accepted: a path")
    target = os.path.abspath(path)
    names = [os.path.basename(target)]
    if not folder:  # the writer's temporary file: the name, a dot, pid, host and 12 hex digits
        names.append(_temp_prefix(target) + f"{os.getpid()}-{_host()}.{'0' * 12}" + TEMP_SUFFIX)
    limit = 255
    with contextlib.suppress(OSError, AttributeError, ValueError):
        limit = os.pathconf(os.path.dirname(target) if os.path.isdir(os.path.dirname(target))
                            else "/", "PC_NAME_MAX")
    for name in names:
        if len(name.encode("utf-8", "surrogateescape")) > limit:
            base = os.path.basename(target)
            base = base if len(base) <= 40 else f"{base[:40]}...({len(base)} characters)"
            raise ValueError(f"{key}: the file name {base!r} is too long for the file system "
                             f"(with the writer's temporary suffix {len(name)} > {limit} "
                             f"bytes); accepted: a file name of at most {limit - 60} "
                             f"characters")
    probe = target if folder else os.path.dirname(target)
    while not os.path.isdir(probe):  # the nearest existing folder must let us create the rest
        if os.path.exists(probe):
            raise ValueError(f"{key}={shown!r}: {probe} is a file, not a folder")
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={shown!r}: the folder {probe} is not writable; accepted: a "
                         f"path in a writable folder")
    if not folder and os.path.isdir(target):
        raise ValueError(f"{key}={shown!r} is a folder; accepted: a file path")
    return path


class LockedError(ValueError):
    """Another process holds the lock of an output."""


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[str]:
    """Hold an exclusive lock on ``path`` (the hidden file ``.{name}.lock`` beside it, locked
    with ``flock``) for the duration of the block; raise :class:`LockedError` at once when
    another process holds it. The lock ends with the process, so a killed holder leaves
    nothing to clean up (the empty lock file stays)."""
    import fcntl

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    lock = os.path.join(folder, "." + os.path.basename(os.path.abspath(path)) + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{path} is being written by another process (it holds the lock "
                              f"{lock}); wait for it to finish or write elsewhere") from None
        yield lock
    finally:
        os.close(fd)


def _owner(name: str, prefix: str) -> Optional[tuple[int, str]]:
    """(pid, host) of a temporary file name of this module, or None."""
    if not (name.startswith(prefix) and name.endswith(TEMP_SUFFIX)):
        return None
    m = re.fullmatch(r"(\d+)-([A-Za-z0-9._-]+)\.[0-9a-f]+",
                     name[len(prefix):-len(TEMP_SUFFIX)])
    return (int(m.group(1)), m.group(2)) if m else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temps(path: str) -> int:
    """Remove the temporary files of ``path`` whose owner process (on this host) has ended;
    returns how many were removed."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix, host = _temp_prefix(path), _host()
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        owner = _owner(name, prefix)
        if owner is None or owner[1] != host or _alive(owner[0]):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
            removed += 1
    return removed


__all__ = ["TEMP_SUFFIX", "is_temp_name", "atomic_path", "atomic_write", "write_bytes",
           "write_text", "write_json", "save_torch", "save_figure", "remove_stale_temps",
           "LockedError", "exclusive_lock", "check_writable"]
