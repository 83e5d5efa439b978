"""Video file I/O through PyAV (H.264 / yuv420p mp4), with atomic writes.

Accepted inputs for :func:`save_video` / :func:`to_uint8_frames`:

* a floating-point ``torch.Tensor`` or ``numpy.ndarray`` of shape ``[C, T, H, W]`` with values in
  ``[-1, 1]`` (the layout an Open-Sora VAE decoder returns for one sample), ``C`` in ``{1, 3}``;
* a ``uint8`` ``torch.Tensor`` or ``numpy.ndarray`` of shape ``[T, H, W, 3]`` (or ``[T, H, W, 1]``).

Encoding is deterministic: identical frames give identical bytes in any process on any
machine with the same PyAV/FFmpeg build, at every size (the 32x32 demo size included): the RGB
frames are converted to yuv420p here, in numpy (BT.601 limited range, as FFmpeg's default, with
each chroma sample the mean of its 2x2 pixels, rounded half to even), so no swscale code path
(its threads, or SIMD kernels chosen by size and alignment) sits between the frames and the
encoder; libx264 runs one thread (``threads=1``, no slice or frame threads, with its default
preset and ``crf`` 23 unless given); the muxer writes no dates.

A file is written to a temporary file of its own in the destination folder and renamed onto
``{name}`` only once the encoder has been flushed and the container closed
(:mod:`opensora_duca.utils.atomic`), so a reader never sees a half-written ``{name}``, and two
processes writing the same file cannot mix their outputs; if anything fails the temporary file is
removed.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np

try:  # torch is a hard dependency of the package, but keep this module importable without it
    import torch
except ImportError:  # pragma: no cover
    torch = None

from .atomic import atomic_path, is_temp_name

ArrayLike = Union["torch.Tensor", np.ndarray]

_ACCEPTED = (
    "accepted inputs: a float torch.Tensor/numpy array [C, T, H, W] with values in [-1, 1] and C "
    "in {1, 3}, or a uint8 torch.Tensor/numpy array [T, H, W, 3] (or [T, H, W, 1])"
)


def _describe(video) -> str:
    shape = tuple(video.shape) if hasattr(video, "shape") else None
    dtype = getattr(video, "dtype", type(video).__name__)
    return f"type={type(video).__name__}, shape={shape}, dtype={dtype}"


def to_uint8_frames(video: ArrayLike) -> np.ndarray:
    """Convert a video to a contiguous ``uint8`` numpy array ``[T, H, W, 3]``.

    Float inputs ``[C, T, H, W]`` in ``[-1, 1]`` are clamped and mapped with
    ``round((x + 1) / 2 * 255)``; uint8 inputs ``[T, H, W, 3|1]`` are passed through.
    Raises ``ValueError`` naming the bad shape/dtype otherwise.
    """
    if torch is not None and isinstance(video, torch.Tensor):
        if video.dtype == torch.uint8:
            arr = video.detach().cpu().numpy()
        elif video.is_floating_point():
            arr = video.detach().to("cpu", torch.float32).numpy()
        else:
            raise ValueError(f"unsupported video tensor dtype ({_describe(video)}); {_ACCEPTED}")
    elif isinstance(video, np.ndarray):
        arr = video
    else:
        raise ValueError(f"unsupported video object ({_describe(video)}); {_ACCEPTED}")

    if arr.dtype == np.uint8:
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise ValueError(f"uint8 video must have shape [T, H, W, 3] ({_describe(video)}); "
                             f"{_ACCEPTED}")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        out = arr
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.ndim != 4 or arr.shape[0] not in (1, 3):
            raise ValueError(
                f"float video must have shape [C, T, H, W] with C in {{1, 3}} "
                f"({_describe(video)}); {_ACCEPTED}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"float video contains NaN or Inf values ({_describe(video)})")
        x = np.clip(arr.astype(np.float32), -1.0, 1.0)
        x = np.rint((x + 1.0) * 127.5).astype(np.uint8)  # [C, T, H, W]
        if x.shape[0] == 1:
            x = np.repeat(x, 3, axis=0)
        out = np.transpose(x, (1, 2, 3, 0))
    else:
        raise ValueError(f"unsupported video dtype ({_describe(video)}); {_ACCEPTED}")

    t, h, w = out.shape[:3]
    if t < 1 or h < 1 or w < 1:
        raise ValueError(f"video has an empty dimension ({_describe(video)})")
    return np.ascontiguousarray(out)


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Pad H and W up to even sizes by repeating the last row/column (yuv420p needs even sizes)."""
    _, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """One RGB ``uint8 [H, W, 3]`` frame (even H, W) as a yuv420p plane stack
    ``uint8 [H * 3 / 2, W]`` (Y, then U, then V; PyAV's layout): BT.601 limited range, chroma
    the mean of each 2x2 block. Pure float64 arithmetic: the same bytes on every machine."""
    x = frame.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    h, w = r.shape

    def pooled(c):
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    rp, gp, bp = pooled(r), pooled(g), pooled(b)
    u = 128.0 + (-37.797 * rp - 74.203 * gp + 112.0 * bp) / 255.0
    v = 128.0 + (112.0 * rp - 93.786 * gp - 18.214 * bp) / 255.0
    q = [np.clip(np.rint(c), 0, 255).astype(np.uint8) for c in (y, u, v)]
    return np.concatenate([c.ravel() for c in q]).reshape(h * 3 // 2, w)


def save_video(video: ArrayLike, path: str, fps: float = 8, crf: int | None = None) -> str:
    """Write ``video`` as an H.264 (libx264, yuv420p) mp4 at ``path``, atomically.

    ``crf`` is passed to libx264 when given (libx264's default, 23, otherwise).
    Odd heights/widths are padded to even by edge replication. Returns ``path``.
    """
    import av  # local import: only needed when writing

    frames = _pad_even(to_uint8_frames(video))
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    _, h, w, _ = frames.shape
    with atomic_path(path) as tmp:
        container = av.open(tmp, mode="w", format="mp4")
        try:
            from fractions import Fraction

            rate = Fraction(fps).limit_denominator(1001)
            stream = container.add_stream("libx264", rate=rate)
            stream.width = w
            stream.height = h
            stream.pix_fmt = "yuv420p"
            # one encoder thread: libx264 picks its thread count (and with it the bitstream)
            # from the CPUs the process may use, so identical frames gave different bytes
            stream.codec_context.thread_count = 1
            stream.codec_context.thread_type = "NONE"
            if crf is not None:
                stream.options = {"crf": str(int(crf))}
            for frame in frames:  # converted here: the encoder gets its own pixel format
                av_frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
                for packet in stream.encode(av_frame):
                    container.mux(packet)
            for packet in stream.encode():  # flush
                container.mux(packet)
        finally:
            container.close()
    return path


def read_video(path: str) -> np.ndarray:
    """Decode all frames of the first video stream of ``path`` to ``uint8 [T, H, W, 3]`` (RGB)."""
    import av

    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    frames = []
    with av.open(path, mode="r") as container:
        if not container.streams.video:
            raise ValueError(f"no video stream in {path}")
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
    if not frames:
        raise ValueError(f"no decodable frames in {path}")
    return np.stack(frames, axis=0)


def is_complete_video(path: str) -> bool:
    """True if ``path`` exists, is a non-empty regular file, is not a temporary file of
    :mod:`opensora_duca.utils.atomic`, and at least one video frame can be decoded from it."""
    try:
        if is_temp_name(path) or not os.path.isfile(path) or os.path.getsize(path) == 0:
            return False
        import av

        with av.open(path, mode="r") as container:
            if not container.streams.video:
                return False
            for _ in container.decode(container.streams.video[0]):
                return True
        return False
    except Exception:
        return False


__all__ = [
    "save_video",
    "read_video",
    "is_complete_video",
    "to_uint8_frames",
    "rgb_to_yuv420p",
]
