"""Reliability round 3 (issue 21): every case is one row of a table.

A row is ``(id, call, code, pattern, files)``: ``call(tmp_path)`` runs a tool's ``main`` in this
process (or an API function) and returns ``(code, message)`` -- the exit code and stderr of a
tool, or the exception's class name and text of a call; ``pattern`` is a regular expression the
one-line message must match; ``files(tmp_path)`` (or None) checks what is on disk afterwards.
Tools are called in-process and before their expensive work, so the table runs in seconds.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
from typing import Callable, NamedTuple, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = os.path.join(ROOT, "configs/demo/inference.py")
TINY_CFG = os.path.join(ROOT, "configs/tiny/inference.py")


class Row(NamedTuple):
    id: str
    call: Callable
    code: object  # an exit code, or the name of the exception a call raises
    pattern: str
    files: Optional[Callable] = None


def tool(main, *argv):
    """Run a tool's ``main(argv)`` here; (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, err.getvalue()


def api(fn, *args, **kwargs):
    """Call ``fn``; (exception class name, message) or ("ok", repr of the result)."""
    try:
        return "ok", repr(fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - the table checks the class
        return type(exc).__name__, str(exc)


# ---------------------------------------------------------------------------------------------
# 1. frontier: no default --out in tracked results; a mismatching / unreadable / locked file is
#    refused with one line and kept as it is

def _frontier(*argv):
    from opensora_duca.cli.frontier import main
    return tool(main, *argv)


FOREIGN = {"meta": {"config": "other.py", "quick": False, "prompts": ["x"], "seeds": [0],
                    "steps": 30}, "reference": {"policy": "none"}, "points": [{"family": "A"}]}


def _frontier_on(content):
    def call(tmp_path):
        out = tmp_path / "f.json"
        out.write_text(content)
        return _frontier("--quick", "--out", out)
    return call


def _kept(content):
    def files(tmp_path):
        assert (tmp_path / "f.json").read_text() == content
        assert not (tmp_path / "f.png").exists()
    return files


def _frontier_locked(tmp_path):
    from opensora_duca.utils.atomic import exclusive_lock
    out = tmp_path / "f.json"
    with exclusive_lock(str(out)):
        return _frontier("--quick", "--out", out)


def _frontier_default_out(tmp_path):
    from opensora_duca.cli.frontier import parse_args
    out = parse_args([]).out
    tracked = os.path.join(ROOT, "docs")
    return ("tracked" if os.path.abspath(out).startswith(tracked) else "ok"), out


ROWS = [
    Row("frontier-default-out-untracked", _frontier_default_out, "ok", r"^outputs/"),
    Row("frontier-foreign-meta", _frontier_on(json.dumps(FOREIGN)), 2,
        r"f\.json' holds a sweep of other settings \(differs in config, prompts, quick, "
        r"steps\); it is kept", _kept(json.dumps(FOREIGN))),
    Row("frontier-truncated-json", _frontier_on('{"meta": {"config": '), 2,
        r"f\.json' cannot be read.*JSONDecodeError.*it is kept", _kept('{"meta": {"config": ')),
    Row("frontier-not-a-sweep", _frontier_on("[1, 2]"), 2, r"is not a frontier sweep",
        _kept("[1, 2]")),
    Row("frontier-locked", _frontier_locked, 2, r"f\.json is being written by another process",
        lambda p: not (p / "f.json").exists() or pytest.fail("written")),
    Row("frontier-negative-seed", lambda p: _frontier("--seeds", "-1", "--out", p / "f.json"), 2,
        r"--seeds -1: accepted: integers in \[0, 2\*\*63\)"),
]


# ---------------------------------------------------------------------------------------------
# 6. determinism: identical inputs give identical bytes (mp4 at the demo size, .latents.pt)

def _demo_frames(seed=0):
    import numpy as np
    t = np.linspace(0, 1, 32)
    base = np.sin(6 * t + seed)[:, None] * np.cos(4 * t)[None, :] * 120 + 128
    frames = np.stack([np.roll(base, k, axis=1) for k in range(8)])[..., None]
    return np.concatenate([frames, frames[:, ::-1], frames * 0.5], -1).astype(np.uint8)


def _mp4_repeat(tmp_path):
    """The same 8 x 32 x 32 frames 12 times, other videos encoded in between: one file."""
    from opensora_duca.utils.video import save_video
    frames, digests = _demo_frames(), set()
    for i in range(12):
        save_video(_demo_frames(i + 1), str(tmp_path / "other.mp4"))
        save_video(frames, str(tmp_path / f"v{i}.mp4"))
        digests.add((tmp_path / f"v{i}.mp4").read_bytes())
    return "ok", f"{len(digests)} distinct files"


def _mp4_no_swscale(tmp_path):
    """The encoder gets yuv420p frames made here: no swscale conversion (whose code path
    depends on size, alignment and threads) between the frames and libx264."""
    import av

    from opensora_duca.utils.video import save_video

    orig = av.video.reformatter.VideoReformatter.reformat
    converted = []

    def spy(self, frame, *a, **k):  # PyAV calls it for every frame; a no-op returns the frame
        out = orig(self, frame, *a, **k)
        converted.append(out is not frame)
        return out
    av.video.reformatter.VideoReformatter.reformat = spy
    try:
        save_video(_demo_frames(), str(tmp_path / "v.mp4"))
    finally:
        av.video.reformatter.VideoReformatter.reformat = orig
    return "ok", f"{sum(converted)} frames converted by swscale"


def _latents_bytes(tmp_path):
    import torch

    from opensora_duca.utils.atomic import save_torch
    lat = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    save_torch(str(tmp_path / "a.latents.pt"), lat)
    save_torch(str(tmp_path / "b.latents.pt"), lat.clone())
    same = (tmp_path / "a.latents.pt").read_bytes() == (tmp_path / "b.latents.pt").read_bytes()
    return "ok", f"identical={same}"


ROWS += [
    Row("mp4-32x32-identical-bytes", _mp4_repeat, "ok", r"^1 distinct files$"),
    Row("mp4-no-swscale-between-frames-and-encoder", _mp4_no_swscale, "ok",
        r"^0 frames converted"),
    Row("latents-pt-identical-bytes", _latents_bytes, "ok", r"identical=True"),
]


class Built(Exception):
    """Raised when a tool starts its expensive work (building the model)."""


@pytest.fixture
def no_build(monkeypatch):
    """Every tool refuses before it builds a model: building raises :class:`Built`."""
    import importlib

    def built(*a, **k):
        raise Built("the model was built before the error was found")
    for mod in ("frontier", "inference", "demo", "calibrate"):
        m = importlib.import_module(f"opensora_duca.cli.{mod}")
        if hasattr(m, "build_from_config"):
            monkeypatch.setattr(m, "build_from_config", built)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_row(row, tmp_path, no_build):
    code, message = row.call(tmp_path)
    assert code == row.code, (code, message)
    if isinstance(row.code, int) and row.code != 0:
        assert message.count("\n") <= 1, message  # one line
    assert re.search(row.pattern, message), message
    if row.files is not None:
        row.files(tmp_path)
