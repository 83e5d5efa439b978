import os
import sys

import numpy as np
import pytest
import torch
from write_utils import dead_writer_temp

from opensora_duca.utils.video import (
    is_complete_video,
    read_video,
    save_video,
    to_uint8_frames,
)


def smooth_video(t=6, h=32, w=48):
    """Float [C, T, H, W] in [-1, 1]: smooth gradients that compress well."""
    ys = torch.linspace(-1, 1, h).view(1, 1, h, 1)
    xs = torch.linspace(-1, 1, w).view(1, 1, 1, w)
    ts = torch.linspace(0, 1, t).view(1, t, 1, 1)
    r = (0.8 * xs + 0.1 * ts).expand(1, t, h, w)
    g = (0.8 * ys - 0.1 * ts).expand(1, t, h, w)
    b = (0.4 * xs * ys).expand(1, t, h, w)
    return torch.cat([r, g, b], 0).clamp(-1, 1)


def test_to_uint8_mapping():
    v = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0]).view(1, 1, 1, 5)
    out = to_uint8_frames(v)
    assert out.shape == (1, 1, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255, 0]  # clamped; 127.5 rounds to 128


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 8, 8), np.uint8),  # missing channel axis
        np.zeros((4, 8, 8, 2), np.uint8),  # 2 channels
        torch.zeros(4, 3, 8, 8, 3),  # 5-D
        torch.zeros(2, 4, 8, 8),  # C=2 float
        torch.zeros(3, 4, 8, 8, dtype=torch.int32),  # int tensor
        [1, 2, 3],  # not an array
    ],
)
def test_bad_inputs_raise_clear_errors(bad):
    with pytest.raises(ValueError, match="accepted"):
        to_uint8_frames(bad)


def test_round_trip_float_tensor(tmp_path):
    v = smooth_video()
    path = str(tmp_path / "a.mp4")
    save_video(v, path, fps=8)
    assert is_complete_video(path)
    frames = read_video(path)
    assert frames.shape == (6, 32, 48, 3) and frames.dtype == np.uint8
    ref = to_uint8_frames(v).astype(np.float64)
    assert np.abs(frames.astype(np.float64) - ref).mean() < 3.0  # lossy H.264, smooth content
    assert os.listdir(tmp_path) == ["a.mp4"]  # no temporary file left


def test_round_trip_uint8_numpy_constant(tmp_path):
    v = np.full((5, 16, 16, 3), 77, np.uint8)
    path = str(tmp_path / "c.mp4")
    save_video(v, path)
    frames = read_video(path)
    assert frames.shape == v.shape
    assert np.abs(frames.astype(int) - 77).max() <= 1


def test_odd_sizes_are_padded_to_even(tmp_path):
    v = smooth_video(t=3, h=33, w=47)
    path = str(tmp_path / "odd.mp4")
    save_video(v, path)
    frames = read_video(path)
    assert frames.shape == (3, 34, 48, 3)
    ref = to_uint8_frames(v).astype(np.float64)
    assert np.abs(frames[:, :33, :47].astype(np.float64) - ref).mean() < 3.0


def test_failing_writer_leaves_no_file(tmp_path, monkeypatch):
    import av

    path = str(tmp_path / "x.mp4")
    calls = {"n": 0}
    real = av.VideoFrame.from_ndarray

    def exploding(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated encoder failure")
        return real(*a, **k)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", exploding)
    with pytest.raises(RuntimeError, match="simulated"):
        save_video(smooth_video(), path)
    assert os.listdir(tmp_path) == []  # neither x.mp4 nor its temporary file


def test_failed_rewrite_keeps_previous_file(tmp_path, monkeypatch):
    import av

    path = str(tmp_path / "x.mp4")
    save_video(smooth_video(), path)
    before = open(path, "rb").read()

    def boom(*a, **k):
        raise KeyboardInterrupt  # even an interrupt cleans up

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", boom)
    with pytest.raises(KeyboardInterrupt):
        save_video(smooth_video(t=2), path)
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["x.mp4"]


def test_is_complete_video(tmp_path):
    good = str(tmp_path / "good.mp4")
    save_video(np.full((2, 16, 16, 3), 10, np.uint8), good)
    assert is_complete_video(good)
    assert not is_complete_video(str(tmp_path / "missing.mp4"))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert not is_complete_video(str(empty))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    assert not is_complete_video(str(junk))
    # a temporary file is never complete, even when its content would decode
    with open(good, "rb") as f:
        part = dead_writer_temp(str(tmp_path / "other.mp4"), f.read())
    assert os.path.basename(part).startswith(".other.mp4.") and part.endswith(".partial")
    assert not is_complete_video(part)
    assert not is_complete_video(str(tmp_path))  # a folder


def test_read_missing_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_video(str(tmp_path / "nope.mp4"))


_ENCODE = """
import os, sys
import numpy as np
from opensora_duca.utils.video import save_video
if sys.argv[2] == "one-cpu":
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
frames = np.random.default_rng(0).integers(0, 256, size=(12, 256, 320, 3), dtype=np.uint8)
save_video(frames, sys.argv[1], fps=8)
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs >= 2 usable CPUs (the encoder's thread count follows them)")
def test_identical_frames_encode_to_identical_bytes_in_separate_processes(tmp_path):
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    paths = []
    for i, cpus in enumerate(("all-cpus", "one-cpu", "all-cpus")):
        paths.append(tmp_path / f"v{i}.mp4")
        subprocess.run([sys.executable, "-c", _ENCODE, str(paths[-1]), cpus], env=env,
                       check=True, timeout=120)
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1] == data[2]
    assert b"creation_time" not in data[0]
