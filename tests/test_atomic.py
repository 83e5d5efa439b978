"""opensora_duca.utils.atomic: unique temporary files, concurrent writers (real processes), clean
failure, stale-temporary removal that spares live writers."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from write_utils import dead_writer_temp, live_writer

from opensora_duca.utils.atomic import (
    atomic_path,
    is_temp_name,
    remove_stale_temps,
    write_bytes,
    write_json,
)
from opensora_duca.utils.video import is_complete_video, read_video

# Each writer process waits for the go file, then writes its own content to the same target
# ROUNDS times; it prints "ok" when every write returned without an exception.
_WRITER = """
import os, sys, time
import numpy as np
kind, target, go, value, rounds = sys.argv[1:6]
value, rounds = int(value), int(rounds)
if kind == "video":
    from opensora_duca.utils.video import save_video
    frames = np.full((4 + value % 3, 32, 32, 3), value, np.uint8)  # frame count marks the writer
    write = lambda: save_video(frames, target)
else:
    from opensora_duca.utils.atomic import write_bytes
    data = bytes([value]) * (3 << 20)
    write = lambda: write_bytes(target, data)
while not os.path.exists(go):
    time.sleep(0.001)
for _ in range(rounds):
    write()
print("ok", flush=True)
"""


def _race(tmp_path, kind, values, rounds):
    target = str(tmp_path / ("out.mp4" if kind == "video" else "out.bin"))
    go = str(tmp_path / "go")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, kind, target, go, str(v),
                               str(rounds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for v in values]
    time.sleep(0.5)
    open(go, "w").close()
    seen = []  # what a reader sees while the writers race: always a finished file
    while any(p.poll() is None for p in procs):
        if os.path.exists(target):
            seen.append(_content(kind, target))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "ok", err
    os.remove(go)
    return target, seen


def _content(kind, path):
    if kind == "video":
        frames = read_video(path).astype(int)
        return frames.shape[0], int(np.median(frames))
    with open(path, "rb") as f:
        data = f.read()
    return len(data), set(data)


def test_two_processes_writing_one_video(tmp_path):
    values = (40, 200)
    target, seen = _race(tmp_path, "video", values, rounds=10)
    assert os.listdir(tmp_path) == ["out.mp4"]  # no temporary file left
    assert is_complete_video(target)
    expected = {(4 + v % 3, v) for v in values}  # (frames, grey level) of each writer
    for count, grey in seen + [_content("video", target)]:
        near = [(n, v) for n, v in expected if n == count and abs(v - grey) <= 2]
        assert near, (count, grey, expected)


def test_two_processes_writing_one_file(tmp_path):
    target, seen = _race(tmp_path, "bytes", (1, 2), rounds=20)
    assert os.listdir(tmp_path) == ["out.bin"]
    for length, content in seen + [_content("bytes", target)]:
        assert length == 3 << 20 and content in ({1}, {2})


def test_temporary_names_are_unique_and_hidden(tmp_path):
    target = str(tmp_path / "a.json")
    with atomic_path(target) as t1, atomic_path(target) as t2:
        assert t1 != t2 and os.path.dirname(t1) == str(tmp_path)
        assert is_temp_name(t1) and os.path.basename(t1).startswith(".a.json.")
        assert f".{os.getpid()}-" in os.path.basename(t1)
        with open(t1, "w") as f:
            f.write("1")
        with open(t2, "w") as f:
            f.write("2")
    # the inner writer finished first, the outer one last: the last rename wins
    assert open(target).read() == "1" and os.listdir(tmp_path) == ["a.json"]
    assert not is_temp_name("a.json") and not is_temp_name("x.partial.mp4")


def test_failure_removes_only_its_own_temporary(tmp_path):
    target = str(tmp_path / "r.json")
    write_json(target, {"v": 1})
    proc, other = live_writer(target)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with atomic_path(target) as tmp:
                with open(tmp, "w") as f:
                    f.write("{half")
                raise RuntimeError("boom")
        assert not os.path.exists(tmp)
        assert os.path.exists(other)  # another process's temporary is never touched
        assert json.load(open(target)) == {"v": 1}  # the previous file is intact
    finally:
        proc.kill()
        proc.wait()


def test_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_bytes(str(tmp_path / "sub" / "m.bin"), b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_remove_stale_temps_spares_live_and_foreign_writers(tmp_path):
    target = str(tmp_path / "v.mp4")
    dead = [dead_writer_temp(target), dead_writer_temp(target)]
    assert all(os.path.exists(d) for d in dead)
    other_target = dead_writer_temp(str(tmp_path / "w.mp4"))
    host = "not-" + socket.gethostname().replace("_", "-")
    foreign = str(tmp_path / f".v.mp4.1-{host}.0a1b.partial")  # written on another host
    unowned = str(tmp_path / ".v.mp4.partial")  # no owner in the name: never removed
    for p in (foreign, unowned):
        open(p, "w").close()
    proc, live = live_writer(target)
    try:
        assert remove_stale_temps(target) == 2
        assert not any(os.path.exists(d) for d in dead)
        for kept in (live, foreign, unowned, other_target):
            assert os.path.exists(kept), kept
    finally:
        proc.kill()
        proc.wait()
    assert remove_stale_temps(target) == 1  # the killed writer's temporary is stale now
    assert not os.path.exists(live)
