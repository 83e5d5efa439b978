"""Demo judge: checks a generated video against its SyntheticShapes caption, no learned model.

For a clip (uint8 [T, H, W, 3]) and a caption such as ``"a red circle moving left"``:

1. background = the per-channel median colour of the clip (the shape covers a small part);
2. foreground = pixels farther than ``fg_threshold`` (RGB distance, 0..441) from it; per frame
   the largest 8-connected foreground component is the object (stray specks are ignored);
3. colour = majority vote, over the object pixels of all frames, of the nearest named colour
   (background excluded);
4. shape = from two medians over frames: the vertical position of the object's centroid in its
   bounding box (0 = top, 1 = bottom; the apex-up triangle ~0.63, circle and square 0.5) and the
   fill ratio of the bounding box (square 1, circle ~0.8): triangle if the position is
   >= ``triangle_min_vpos``, else square if the fill is >= ``square_min_fill``, else circle
   (``SHAPE_THRESHOLDS``; robust to H.264 chroma blur, where fill ratios alone are not);
5. motion = least-squares slope of the object's centroid over frames, times (T - 1): the total
   displacement (dx, dy) in pixels; "still" if max(|dx|, |dy|) < ``move_threshold``, otherwise
   the dominant axis and its sign (image y grows downwards: negative dy is "up");
6. flicker = mean absolute difference (0..255) between consecutive frames over pixels that are
   background in both (``flicker``), and over all pixels (``flicker_all``).

``ok`` is colour AND motion right (shape is reported, not required).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from ..data.synthetic import COLORS, SHAPES, parse_caption

FG_THRESHOLD = 100.0  # RGB distance from the background above which a pixel is foreground
MOVE_THRESHOLD = 4.0  # pixels of total displacement below which the object is "still"
SHAPE_THRESHOLDS = dict(triangle_min_vpos=0.545, square_min_fill=0.9)
MIN_OBJECT_PIXELS = 4  # a frame whose largest component is smaller has no object

_COLOR_NAMES = list(COLORS)
_COLOR_RGB = np.asarray([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)


def check_frames(frames: Any) -> np.ndarray:
    """Validate a clip: uint8 (or float in 0..255) array [T, H, W, 3] -> float32 array."""
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 2:
        raise ValueError(f"frames with shape {arr.shape} are not accepted; accepted: an array "
                         "[T, H, W, 3] (uint8 or 0..255 floats) with T >= 2")
    return arr.astype(np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a boolean [H, W] mask (pure numpy/python flood fill)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for sy, sx in zip(*np.nonzero(mask)):
        if labels[sy, sx]:
            continue
        current += 1
        labels[sy, sx] = current
        stack, size = [(sy, sx)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = current
                        stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def classify_shape(fill_ratio: float | None, vpos: float | None) -> str | None:
    if fill_ratio is None or vpos is None:
        return None
    if vpos >= SHAPE_THRESHOLDS["triangle_min_vpos"]:
        return "triangle"
    return "square" if fill_ratio >= SHAPE_THRESHOLDS["square_min_fill"] else "circle"


def classify_motion(dx: float, dy: float, move_threshold: float = MOVE_THRESHOLD) -> str:
    if max(abs(dx), abs(dy)) < move_threshold:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def analyze(frames: Any, *, fg_threshold: float = FG_THRESHOLD,
            move_threshold: float = MOVE_THRESHOLD) -> dict[str, Any]:
    """Detect colour, shape, motion and flicker of a clip (no caption needed)."""
    x = check_frames(frames)
    t_len = x.shape[0]
    background = np.median(x.reshape(-1, 3), axis=0)
    dist = np.linalg.norm(x - background, axis=-1)  # [T, H, W]
    fg = dist > fg_threshold
    objects = [_largest_component(m) for m in fg]

    centroids, fills, vposs, pixels = [], [], [], []
    for t, obj in enumerate(objects):
        n = int(obj.sum())
        if n < MIN_OBJECT_PIXELS:
            continue
        ys, xs = np.nonzero(obj)
        centroids.append((t, xs.mean(), ys.mean()))
        height = ys.max() - ys.min() + 1
        fills.append(n / (height * (xs.max() - xs.min() + 1)))
        vposs.append((ys.mean() - ys.min() + 0.5) / height)
        pixels.append(x[t][obj])

    color = shape = direction = None
    fill = vpos = None
    dx = dy = float("nan")
    color_votes: dict[str, int] = {}
    if pixels:
        px = np.concatenate(pixels)  # [N, 3]
        nearest = np.argmin(((px[:, None, :] - _COLOR_RGB[None]) ** 2).sum(-1), axis=1)
        counts = np.bincount(nearest, minlength=len(_COLOR_NAMES))
        color_votes = {c: int(k) for c, k in zip(_COLOR_NAMES, counts) if k}
        color = _COLOR_NAMES[int(counts.argmax())]
        fill, vpos = float(np.median(fills)), float(np.median(vposs))
        shape = classify_shape(fill, vpos)
    if len(centroids) >= 2:
        ts, cx, cy = (np.asarray(v, dtype=np.float64) for v in zip(*centroids))
        ts_c = ts - ts.mean()
        denom = float((ts_c ** 2).sum())
        dx = float((ts_c * (cx - cx.mean())).sum() / denom * (t_len - 1))
        dy = float((ts_c * (cy - cy.mean())).sum() / denom * (t_len - 1))
        direction = classify_motion(dx, dy, move_threshold)

    bg_both = ~fg[1:] & ~fg[:-1]
    diff = np.abs(x[1:] - x[:-1]).mean(-1)  # [T-1, H, W]
    flicker = float(diff[bg_both].mean()) if bg_both.any() else float("nan")
    return dict(detected_color=color, detected_shape=shape, detected_direction=direction,
                fill_ratio=fill, vertical_position=vpos, displacement=(dx, dy), color_votes=color_votes,
                frames_with_object=len(centroids), fg_fraction=float(fg.mean()),
                background=[float(v) for v in background], flicker=flicker,
                flicker_all=float(diff.mean()))


def judge(frames: Any, caption: str, *, fg_threshold: float = FG_THRESHOLD,
          move_threshold: float = MOVE_THRESHOLD) -> dict[str, Any]:
    """Judge a clip against its caption.

    Returns ``dict(color_ok, shape_ok, motion_ok, ok, expected_color, expected_shape,
    expected_direction, caption, **analyze(frames))``; ``ok`` = colour and motion right.
    Raises ValueError for frames that are not [T, H, W, 3] or a caption outside the
    SyntheticShapes grammar.
    """
    want = parse_caption(caption)
    got = analyze(frames, fg_threshold=fg_threshold, move_threshold=move_threshold)
    color_ok = got["detected_color"] == want["color"]
    shape_ok = got["detected_shape"] == want["shape"]
    motion_ok = got["detected_direction"] == want["direction"]
    return dict(color_ok=color_ok, shape_ok=shape_ok, motion_ok=motion_ok,
                ok=color_ok and motion_ok, caption=caption, expected_color=want["color"],
                expected_shape=want["shape"], expected_direction=want["direction"], **got)


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracies (colour, shape, motion, both = ``ok``) and mean flicker over judged clips."""
    n = len(results)
    if n == 0:
        return dict(n=0, color=None, shape=None, motion=None, both=None, flicker=None)

    def mean(key):
        return sum(bool(r[key]) for r in results) / n

    flick = [r["flicker"] for r in results if r["flicker"] == r["flicker"]]
    return dict(n=n, color=mean("color_ok"), shape=mean("shape_ok"), motion=mean("motion_ok"),
                both=mean("ok"), flicker=float(np.mean(flick)) if flick else None)


def read_video(path: str) -> np.ndarray:
    """Decode a video file (e.g. mp4 via PyAV) to uint8 [T, H, W, 3] (the project's reader)."""
    from ..utils.video import read_video as _read

    frames = _read(path)
    if len(frames) == 0:
        raise ValueError(f"video {path!r} has no frames")
    return frames


def write_video(path: str, frames: Any, fps: int = 8) -> None:
    """Encode uint8 [T, H, W, 3] as a high-quality H.264 mp4 (crf 10), atomically."""
    from ..utils.video import save_video

    arr = np.asarray(frames, dtype=np.uint8)
    check_frames(arr)
    save_video(arr, path, fps=fps, crf=10)


def caption_from_name(filename: str) -> str:
    """``{prompt}-{i}.mp4`` or ``{prompt}.mp4`` -> prompt (underscores read as spaces, as
    ``pipeline.prompt_to_filename`` writes them)."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    prompt, sep, idx = stem.rpartition("-")
    if not (sep and idx.isdigit()):
        prompt = stem
    prompt = prompt.replace("_", " ").strip()
    if not prompt:
        raise ValueError(f"file name {filename!r} is not accepted with --from-names; accepted: "
                         "'{prompt}-{i}.mp4' or '{prompt}.mp4', e.g. "
                         "'a_red_circle_moving_left-0.mp4'")
    return prompt


def judge_files(items: Iterable[tuple[str, str]], video_dir: str = ".") -> list[dict[str, Any]]:
    """Judge ``(file, caption)`` pairs; files are relative to ``video_dir``."""
    out = []
    for name, caption in items:
        res = judge(read_video(os.path.join(video_dir, name)), caption)
        res["file"] = name
        out.append(res)
    return out


def format_table(results: Sequence[dict[str, Any]]) -> str:
    rows = [("file", "caption", "colour", "shape", "motion", "ok", "flicker")]
    for r in results:
        mark = lambda ok, v: f"{'+' if ok else '-'}{v}"  # noqa: E731
        rows.append((str(r.get("file", "")), r["caption"],
                     mark(r["color_ok"], r["detected_color"]),
                     mark(r["shape_ok"], r["detected_shape"]),
                     mark(r["motion_ok"], r["detected_direction"]),
                     "yes" if r["ok"] else "no", f"{r['flicker']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def to_jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else
                                 str(o)))
