"""Demo judge: checks a generated video against its SyntheticShapes caption, no learned model.

For a clip (uint8 [T, H, W, 3]) and a caption such as ``"a red circle moving left"``:

1. background = the per-channel median colour of the clip (the shape covers a small part);
2. foreground = pixels farther than ``fg_threshold`` (RGB distance, 0..441) from it; per frame
   the largest 8-connected foreground component is the object;
3. one object: a frame is "fragmented" when its largest component holds less than
   ``MIN_OBJECT_SHARE`` of the frame's foreground pixels, and "empty" when that component has
   fewer than ``MIN_OBJECT_PIXELS`` pixels. The clip shows one object (``one_object``) when at
   most ``MAX_BAD_FRAME_SHARE`` of its frames are fragmented or empty;
4. colour = majority vote, over the object pixels of all frames, of the nearest named colour;
5. shape = template matching, per frame with an object, majority over those frames: the object's
   soft mask (RGB distance from the background divided by the object's 90th-percentile distance,
   clipped to 0..1, other components zeroed) is compared with every candidate shape drawn by
   ``synthetic.shape_mask`` (the dataset's own stencil) at sizes around the object's
   half-maximum bounding box, blurred by a Gaussian of each sigma in ``TEMPLATE_SIGMAS`` and
   shifted by up to one pixel; the score of a shape is its best soft IoU (sum of minima over sum
   of maxima). Searching over the blur lets a blurred square match the blurred square stencil
   instead of a circle, which a fill-ratio rule cannot tell apart;
6. motion = least-squares slope over frames, times (T - 1), of the centroid of the object's
   pieces: every component of at least ``MIN_OBJECT_PIXELS`` pixels, weighted by its pixels (a
   whole shape: its largest component). The total displacement (dx, dy) in pixels; "still" if
   max(|dx|, |dy|) < ``move_threshold``, otherwise the dominant axis and its sign (image y
   grows downwards: negative dy is "up"). A shape drawn in pieces whose largest piece changes
   from frame to frame has a largest-component centroid that jumps while the shape stays put;
   the pieces' centroid does not, so such a clip reads as what it is: ``fragmented`` (more
   than ``MAX_BAD_FRAME_SHARE`` of its frames fragmented), not a direction
   (``largest_piece_displacement`` keeps what the largest piece alone would say);
7. flicker = mean absolute difference (0..255) between consecutive frames over pixels that are
   background in both (``flicker``), and over all pixels (``flicker_all``).

``ok`` is colour AND motion right AND one object; shape is judged and reported (``shape_ok``,
``all_ok`` = ``ok`` and shape right) but not part of ``ok``.

How the thresholds were chosen: on SyntheticShapes renders of the training recipe only (the
first 300 clips of the "train" split with ``start="cross"``), never on generated videos. Each
clip was judged clean, after an H.264 round trip through ``opensora_duca.utils.video`` (crf 10
and the encoder's default), and Gaussian-blurred (sigma 0.5, 1.0, 1.5 per channel). In all
1800 judged clips colour, motion and shape were right, every frame's largest component held
100% of the foreground, and the right shape's score beat the next best by >= 0.047 (>= 0.142
clean or blurred up to sigma 1). The same clips cut into 3 or 4 pieces by 2-pixel background
gaps left the largest piece <= 50% of the foreground in every frame. ``MIN_OBJECT_SHARE`` = 0.8
sits between the two; ``MAX_BAD_FRAME_SHARE`` = 0.25 (2 of 8 frames) is a tolerance for a
brief glitch, not a measured value: no render had a fragmented or empty frame.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from ..data.synthetic import COLORS, SHAPES, parse_caption, shape_mask

FG_THRESHOLD = 100.0  # RGB distance from the background above which a pixel is foreground
MOVE_THRESHOLD = 4.0  # pixels of total displacement below which the object is "still"
MIN_OBJECT_PIXELS = 4  # a frame whose largest component is smaller has no object
MIN_OBJECT_SHARE = 0.8  # a frame whose largest component holds less foreground is fragmented
MAX_BAD_FRAME_SHARE = 0.25  # a clip with more fragmented or empty frames is not one object
TEMPLATE_SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.0)  # Gaussian blurs tried on the shape stencils
TEMPLATE_SIZES = (-2, -1, 0, 1, 2, 3)  # stencil sizes tried, relative to the object's box side
PEAK_PERCENTILE = 90.0  # the object's "full" colour distance, for the soft mask

_COLOR_NAMES = list(COLORS)
_COLOR_RGB = np.asarray([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)


def check_frames(frames: Any) -> np.ndarray:
    """Validate a clip: uint8 (or float in 0..255) array [T, H, W, 3] -> float32 array."""
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 2:
        raise ValueError(f"frames with shape {arr.shape} are not accepted; accepted: an array "
                         "[T, H, W, 3] (uint8 or 0..255 floats) with T >= 2")
    return arr.astype(np.float32)


def components(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """8-connected components of a boolean [H, W] mask (pure numpy/python flood fill):
    ``(labels, sizes)`` with labels 1..n (0 = not in the mask) and ``sizes[k - 1]`` the pixel
    count of component k."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    sizes: list[int] = []
    for sy, sx in zip(*np.nonzero(mask)):
        if labels[sy, sx]:
            continue
        current = len(sizes) + 1
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
        sizes.append(size)
    return labels, sizes


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (zero padding); sigma 0 returns a copy."""
    if sigma == 0:
        return img.copy()
    r = int(np.ceil(3 * sigma))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    out = np.apply_along_axis(np.convolve, 0, img, k, mode="same")
    return np.apply_along_axis(np.convolve, 1, out, k, mode="same")


@functools.lru_cache(maxsize=None)
def _template_bank(canvas: int, size: int) -> np.ndarray:
    """Stencils of every shape at ``size``, centred on a [canvas, canvas] grid (centre at
    canvas / 2), blurred by every ``TEMPLATE_SIGMAS``: float32 [len(SHAPES), n_sigma, C, C]."""
    bank = np.zeros((len(SHAPES), len(TEMPLATE_SIGMAS), canvas, canvas), dtype=np.float32)
    o = canvas // 2 - size // 2
    for i, shape in enumerate(SHAPES):
        base = np.zeros((canvas, canvas), dtype=np.float64)
        base[o:o + size, o:o + size] = shape_mask(shape, size)
        for j, sigma in enumerate(TEMPLATE_SIGMAS):
            bank[i, j] = _blur(base, sigma)
    return bank


def shape_scores(soft: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Best soft IoU of each shape (order ``SHAPES``) with the soft object mask ``soft``
    ([H, W], 0..1) whose half-maximum bounding box is ``box`` = (y0, y1, x0, x1), inclusive."""
    y0, y1, x0, x1 = box
    side = max(y1 - y0, x1 - x0) + 1
    canvas = 2 * (max(soft.shape) // 2) + 8
    pad = canvas
    padded = np.zeros((soft.shape[0] + 2 * pad, soft.shape[1] + 2 * pad), dtype=np.float32)
    padded[pad:pad + soft.shape[0], pad:pad + soft.shape[1]] = soft
    cy, cx = (y0 + y1 + 1) // 2, (x0 + x1 + 1) // 2  # the pixel at (or just past) the centre
    crops = np.stack([padded[pad + cy + dy - canvas // 2:pad + cy + dy + canvas - canvas // 2,
                             pad + cx + dx - canvas // 2:pad + cx + dx + canvas - canvas // 2]
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)])  # [9, C, C]
    best = np.zeros(len(SHAPES))
    for rel in TEMPLATE_SIZES:
        size = side + rel
        if not 2 <= size <= canvas - 8:
            continue
        bank = _template_bank(canvas, size)[:, :, None]  # [S, sigma, 1, C, C]
        inter = np.minimum(bank, crops).sum((-1, -2))
        union = np.maximum(bank, crops).sum((-1, -2))
        best = np.maximum(best, (inter / np.maximum(union, 1e-6)).max((1, 2)))
    return best


def classify_motion(dx: float, dy: float, move_threshold: float = MOVE_THRESHOLD) -> str:
    if max(abs(dx), abs(dy)) < move_threshold:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _frame_shape(dist: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Shape scores of component k of a frame (``dist``: RGB distance from the background):
    its soft mask, zero outside its bounding box grown by 2 pixels and on other components."""
    obj = labels == k
    peak = float(np.percentile(dist[obj], PEAK_PERCENTILE))
    soft = np.clip(dist / max(peak, 1e-6), 0.0, 1.0)
    ys, xs = np.nonzero(obj)
    near = np.zeros_like(obj)
    near[max(ys.min() - 2, 0):ys.max() + 3, max(xs.min() - 2, 0):xs.max() + 3] = True
    soft[~near | ((labels > 0) & ~obj)] = 0.0
    hy, hx = np.nonzero(soft >= 0.5)
    return shape_scores(soft, (hy.min(), hy.max(), hx.min(), hx.max()))


def analyze(frames: Any, *, fg_threshold: float = FG_THRESHOLD,
            move_threshold: float = MOVE_THRESHOLD) -> dict[str, Any]:
    """Detect colour, shape, motion, object count and flicker of a clip (no caption needed)."""
    x = check_frames(frames)
    t_len = x.shape[0]
    background = np.median(x.reshape(-1, 3), axis=0)
    dist = np.linalg.norm(x - background, axis=-1)  # [T, H, W]
    fg = dist > fg_threshold

    centroids, pixels, frame_scores, shares = [], [], [], []
    fragmented = empty = 0
    for t in range(t_len):
        labels, sizes = components(fg[t])
        if not sizes or max(sizes) < MIN_OBJECT_PIXELS:
            empty += 1
            continue
        k = int(np.argmax(sizes)) + 1
        share = max(sizes) / sum(sizes)
        shares.append(share)
        if share < MIN_OBJECT_SHARE:
            fragmented += 1
        obj = labels == k
        ys, xs = np.nonzero(obj)
        keep = [j + 1 for j, n in enumerate(sizes) if n >= MIN_OBJECT_PIXELS]
        ay, ax = np.nonzero(np.isin(labels, keep))  # every piece of the object
        centroids.append((t, ax.mean(), ay.mean(), xs.mean(), ys.mean()))
        pixels.append(x[t][obj])
        frame_scores.append(_frame_shape(dist[t], labels, k))

    color = shape = direction = None
    dx = dy = float("nan")
    color_votes: dict[str, int] = {}
    shape_votes: dict[str, int] = {}
    mean_scores: dict[str, float] = {}
    if pixels:
        px = np.concatenate(pixels)  # [N, 3]
        nearest = np.argmin(((px[:, None, :] - _COLOR_RGB[None]) ** 2).sum(-1), axis=1)
        counts = np.bincount(nearest, minlength=len(_COLOR_NAMES))
        color_votes = {c: int(k) for c, k in zip(_COLOR_NAMES, counts) if k}
        color = _COLOR_NAMES[int(counts.argmax())]
        scores = np.stack(frame_scores)  # [frames, shapes]
        votes = np.bincount(scores.argmax(1), minlength=len(SHAPES))
        shape_votes = {s: int(k) for s, k in zip(SHAPES, votes) if k}
        # majority over frames; a tie goes to the higher mean score
        shape = SHAPES[int(np.lexsort((scores.mean(0), votes))[-1])]
        mean_scores = {s: float(v) for s, v in zip(SHAPES, scores.mean(0))}
    largest = (float("nan"), float("nan"))
    if len(centroids) >= 2:
        ts, cx, cy, lx, ly = (np.asarray(v, dtype=np.float64) for v in zip(*centroids))
        ts_c = ts - ts.mean()
        denom = float((ts_c ** 2).sum())
        slope = lambda v: float((ts_c * (v - v.mean())).sum() / denom * (t_len - 1))  # noqa: E731
        dx, dy = slope(cx), slope(cy)
        largest = (slope(lx), slope(ly))
        direction = classify_motion(dx, dy, move_threshold)
    in_pieces = fragmented > MAX_BAD_FRAME_SHARE * t_len

    bg_both = ~fg[1:] & ~fg[:-1]
    diff = np.abs(x[1:] - x[:-1]).mean(-1)  # [T-1, H, W]
    flicker = float(diff[bg_both].mean()) if bg_both.any() else float("nan")
    return dict(detected_color=color, detected_shape=shape,
                detected_direction="fragmented" if in_pieces else direction,
                pieces_direction=direction, fragmented=in_pieces,
                one_object=(fragmented + empty) <= MAX_BAD_FRAME_SHARE * t_len,
                fragmented_frames=fragmented, empty_frames=empty,
                largest_piece_displacement=largest,
                min_object_share=float(min(shares)) if shares else None,
                shape_votes=shape_votes, shape_scores=mean_scores, displacement=(dx, dy),
                color_votes=color_votes, frames_with_object=len(centroids),
                fg_fraction=float(fg.mean()), background=[float(v) for v in background],
                flicker=flicker, flicker_all=float(diff.mean()))


def judge(frames: Any, caption: str, *, fg_threshold: float = FG_THRESHOLD,
          move_threshold: float = MOVE_THRESHOLD) -> dict[str, Any]:
    """Judge a clip against its caption.

    Returns ``dict(color_ok, shape_ok, motion_ok, ok, all_ok, reason, expected_color,
    expected_shape, expected_direction, caption, **analyze(frames))``: ``ok`` = colour and
    motion right and one object, ``all_ok`` = ``ok`` and shape right, ``reason`` = why
    ``all_ok`` is false (``"; "``-joined, None when it is true). Raises ValueError for frames
    that are not [T, H, W, 3] or a caption outside the SyntheticShapes grammar.
    """
    want = parse_caption(caption)
    got = analyze(frames, fg_threshold=fg_threshold, move_threshold=move_threshold)
    checks = dict(color=(got["detected_color"], want["color"]),
                  shape=(got["detected_shape"], want["shape"]),
                  motion=(got["detected_direction"], want["direction"]))
    reasons = [f"{key}: got {seen}, expected {expected}"
               for key, (seen, expected) in checks.items() if seen != expected]
    if not got["one_object"]:
        reasons.append(f"not one object: {got['fragmented_frames']} fragmented and "
                       f"{got['empty_frames']} empty of {len(np.asarray(frames))} frames "
                       f"(at most {MAX_BAD_FRAME_SHARE:.0%} accepted)")
    color_ok, shape_ok, motion_ok = (seen == expected for seen, expected in checks.values())
    ok = color_ok and motion_ok and got["one_object"]
    return dict(color_ok=color_ok, shape_ok=shape_ok, motion_ok=motion_ok, ok=ok,
                all_ok=ok and shape_ok, reason="; ".join(reasons) or None, caption=caption,
                expected_color=want["color"], expected_shape=want["shape"],
                expected_direction=want["direction"], **got)


SUMMARY_KEYS = dict(color="color_ok", shape="shape_ok", motion="motion_ok",
                    one_object="one_object", ok="ok", all_ok="all_ok")


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Shares of judged clips with colour, shape, motion right, one object, colour and motion
    right (``color_motion``), ``ok`` (colour, motion, one object) and ``all_ok`` (and shape),
    and the mean flicker."""
    n = len(results)
    keys = [*SUMMARY_KEYS, "color_motion"]
    if n == 0:
        return dict(n=0, **{k: None for k in keys}, flicker=None)
    out: dict[str, Any] = dict(n=n)
    for key, field in SUMMARY_KEYS.items():
        out[key] = sum(bool(r[field]) for r in results) / n
    out["color_motion"] = sum(bool(r["color_ok"] and r["motion_ok"]) for r in results) / n
    flick = [r["flicker"] for r in results if r["flicker"] == r["flicker"]]
    out["flicker"] = float(np.mean(flick)) if flick else None
    return out


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
    rows = [("file", "caption", "colour", "shape", "motion", "one object", "ok", "flicker")]
    for r in results:
        mark = lambda ok, v: f"{'+' if ok else '-'}{v}"  # noqa: E731
        rows.append((str(r.get("file", "")), r["caption"],
                     mark(r["color_ok"], r["detected_color"]),
                     mark(r["shape_ok"], r["detected_shape"]),
                     mark(r["motion_ok"], r["detected_direction"]),
                     "yes" if r["one_object"] else "no", "yes" if r["ok"] else "no",
                     f"{r['flicker']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def to_jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else
                                 str(o)))
