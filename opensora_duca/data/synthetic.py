"""Synthetic captioned videos of one coloured shape that moves (the demo model's data).

Every clip is a pure function of an integer seed: one shape (circle, square or triangle) of one
named colour on a dark background, moving left, right, up or down at a fixed speed, or staying
still, always fully inside the frame. Where a moving shape starts is the ``start`` mode:
anywhere it stays inside ("random", the default), at the far edge ("edge"), at the far edge
and centred across the motion ("cross"), or as "cross" with still shapes standing in the
centre of the frame ("centre", what the demo model is trained on). Its caption
names the three attributes in a fixed grammar, e.g. ``"a red circle moving left"`` or
``"a blue square staying still"``.

Splits use disjoint seed ranges: item ``i`` of split ``"train"`` has seed ``i``, item ``i`` of
split ``"heldout"`` has seed ``HELDOUT_SEED_OFFSET + i`` (so a split holds at most
``HELDOUT_SEED_OFFSET`` items). The dataset's own ``seed`` argument is mixed into every item's
random stream, so two datasets with different ``seed`` values give different clips for the
same index while the returned ``seed`` (the item seed) keeps naming the split position.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from ..registry import DATASETS

# Named colours (RGB, uint8). Saturated and pairwise >= 255 apart in RGB, all far from the
# background, so a nearest-colour lookup on a blurry or noisy generated pixel is reliable.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
# unit displacement per frame in image coordinates (x to the right, y downwards)
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}

NUM_FRAMES = 8
IMAGE_SIZE = 32
SHAPE_SIZE = 10  # side of the bounding box of every shape, in pixels
SPEED = 2  # pixels per frame
HELDOUT_SEED_OFFSET = 1_000_000_000
SPLITS = ("train", "heldout")
# where a moving shape starts (see sample_params): "random", "edge" or "cross"
STARTS = ("random", "edge", "cross", "centre")


def caption_for(color: str, shape: str, direction: str) -> str:
    """The caption of a clip: ``"a {color} {shape} moving {direction}"`` or
    ``"a {color} {shape} staying still"``."""
    _check_choice("color", color, COLORS)
    _check_choice("shape", shape, SHAPES)
    _check_choice("direction", direction, DIRECTIONS)
    motion = "staying still" if direction == "still" else f"moving {direction}"
    return f"a {color} {shape} {motion}"


def _words() -> list[str]:
    words = ["a", *COLORS, *SHAPES, "moving", "staying", *DIRECTIONS]
    return list(dict.fromkeys(words))  # unique, order kept


#: every word any caption uses, in a fixed order (the demo text encoder's vocabulary)
VOCABULARY: tuple[str, ...] = tuple(_words())

_CAPTION_RE = re.compile(r"^a (\w+) (\w+) (?:moving (left|right|up|down)|staying (still))$")


def normalize_caption(text: str) -> str:
    """Lower-case, drop punctuation other than letters/digits/spaces, collapse spaces."""
    text = re.sub(r"[^a-z0-9 ]+", " ", str(text).lower())
    return " ".join(text.split())


def parse_caption(text: str) -> dict[str, str]:
    """Inverse of :func:`caption_for`: ``dict(color=, shape=, direction=)``.

    Case and punctuation are ignored. Raises ValueError naming the caption and the accepted
    grammar when the text is not a caption of this dataset.
    """
    norm = normalize_caption(text)
    m = _CAPTION_RE.match(norm)
    if m is None or m.group(1) not in COLORS or m.group(2) not in SHAPES:
        raise ValueError(
            f"caption {text!r} is not a SyntheticShapes caption; accepted: "
            f"'a <color> <shape> moving <left|right|up|down>' or 'a <color> <shape> staying "
            f"still' with color in {list(COLORS)} and shape in {list(SHAPES)}")
    return dict(color=m.group(1), shape=m.group(2), direction=m.group(3) or "still")


def all_captions() -> list[str]:
    """All colour x shape x direction captions (105), in a fixed order."""
    return [caption_for(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]


def caption_set(n: int | None = None) -> list[str]:
    """The caption set: every colour x shape x direction caption (105 distinct) in a FIXED
    order. It is not held out: the "train" split draws from the same captions (only the item
    seeds differ). It is ordered so that any prefix is balanced over colours and directions
    (the i-th prompt has colour i mod 7, direction i mod 5 and shape (i // 35) mod 3 — 7, 5 and
    3 are coprime and 7*5*3 = 105, so all combinations appear once). ``n`` takes the first n
    (1..105)."""
    colors, n_all = list(COLORS), len(COLORS) * len(SHAPES) * len(DIRECTIONS)
    out = [caption_for(colors[i % 7], SHAPES[(i // 35) % 3], DIRECTIONS[i % 5])
           for i in range(n_all)]
    if n is None:
        return out
    if not isinstance(n, int) or not 1 <= n <= n_all:
        raise ValueError(f"caption_set: n={n!r} is out of range; accepted: an int in "
                         f"1..{n_all} or None (all)")
    return out[:n]


def _check_choice(key: str, value: Any, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"{key}={value!r} is not accepted; accepted values: {list(accepted)}")


def shape_mask(shape: str, size: int = SHAPE_SIZE) -> np.ndarray:
    """Boolean [size, size] stencil of a shape filling its bounding box.

    circle: inscribed disc (fill ~0.785); square: the full box (fill 1); triangle: isosceles,
    apex at the top centre, base on the bottom row (fill ~0.5)."""
    _check_choice("shape", shape, SHAPES)
    c = (np.arange(size) + 0.5)  # pixel centres
    yy, xx = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        r = size / 2.0
        return (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    # triangle: half width at height y (from the top) grows linearly from 0 to size/2
    return np.abs(xx - size / 2.0) <= yy / 2.0


def render_clip(color: str, shape: str, direction: str, x0: int, y0: int, *,
                num_frames: int = NUM_FRAMES, image_size: int = IMAGE_SIZE,
                shape_size: int = SHAPE_SIZE, speed: int = SPEED) -> np.ndarray:
    """Draw a clip as uint8 [T, H, W, 3]; (x0, y0) is the top-left corner of the shape's
    bounding box in frame 0. Raises ValueError if the shape would leave the frame."""
    _check_choice("color", color, COLORS)
    _check_choice("direction", direction, DIRECTIONS)
    dx, dy = DIRECTION_VECTORS[direction]
    stencil = shape_mask(shape, shape_size)
    video = np.empty((num_frames, image_size, image_size, 3), dtype=np.uint8)
    video[...] = np.asarray(BACKGROUND, dtype=np.uint8)
    rgb = np.asarray(COLORS[color], dtype=np.uint8)
    for t in range(num_frames):
        x, y = x0 + dx * speed * t, y0 + dy * speed * t
        if not (0 <= x <= image_size - shape_size and 0 <= y <= image_size - shape_size):
            raise ValueError(f"start (x0={x0}, y0={y0}) moving {direction} leaves the "
                             f"{image_size}x{image_size} frame at frame {t}; accepted: starts "
                             f"keeping the {shape_size}px shape inside for all frames")
        video[t, y:y + shape_size, x:x + shape_size][stencil] = rgb
    return video


def _start_range(d: int, num_frames: int, image_size: int, shape_size: int, speed: int):
    travel = speed * (num_frames - 1)
    lo, hi = 0, image_size - shape_size
    if d < 0:
        lo = travel
    elif d > 0:
        hi -= travel
    if hi < lo:
        raise ValueError(f"a {shape_size}px shape moving {speed}px/frame for {num_frames} frames "
                         f"does not fit in image_size={image_size}")
    return lo, hi


def sample_params(seed: int, dataset_seed: int = 0, *, num_frames: int = NUM_FRAMES,
                  image_size: int = IMAGE_SIZE, shape_size: int = SHAPE_SIZE,
                  speed: int = SPEED, start: str = "random") -> dict[str, Any]:
    """The attributes and start position of the clip with item seed ``seed`` (deterministic).

    ``start="random"``: uniform over the positions that keep the shape inside the frame for
    the whole clip. ``start="edge"``: the same across the motion (and for still shapes), but
    along the motion the shape starts at the far edge, so it crosses the frame (a shape
    moving left starts touching the right border). ``start="cross"``: as "edge", and centred
    across the motion, so a moving shape crosses the frame along its middle row or column;
    still shapes stay anywhere. ``start="centre"`` (the demo model's training data): as
    "cross", and a still shape stands in the centre of the frame, where the moving shapes'
    paths cross. The four modes draw the same random numbers, so an item has the same colour,
    shape and direction in all of them.
    """
    _check_choice("start", start, STARTS)
    rng = np.random.default_rng([int(seed), int(dataset_seed)])
    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    dx, dy = DIRECTION_VECTORS[direction]
    xlo, xhi = _start_range(dx, num_frames, image_size, shape_size, speed)
    ylo, yhi = _start_range(dy, num_frames, image_size, shape_size, speed)
    x0, y0 = int(rng.integers(xlo, xhi + 1)), int(rng.integers(ylo, yhi + 1))
    if start in ("edge", "cross", "centre"):  # the draws above keep the random stream the same
        x0 = {-1: xhi, 1: xlo}.get(dx, x0)
        y0 = {-1: yhi, 1: ylo}.get(dy, y0)
    mid = (image_size - shape_size) // 2
    if start in ("cross", "centre") and direction != "still":  # centred across the motion
        x0, y0 = (x0, mid) if dx else (mid, y0)
    if start == "centre" and direction == "still":
        x0, y0 = mid, mid
    return dict(color=color, shape=shape, direction=direction, x0=x0, y0=y0)


def to_tensor(video: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(video)).permute(3, 0, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """float [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (clamped, rounded)."""
    x = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


@DATASETS.register_module("SyntheticShapes")
class SyntheticShapes(torch.utils.data.Dataset):
    """Deterministic on-the-fly dataset of captioned moving-shape clips.

    Args:
        split: "train" (item seeds 0..) or "heldout" (item seeds HELDOUT_SEED_OFFSET..).
        length: number of items (``__len__``), 1..HELDOUT_SEED_OFFSET.
        seed: dataset seed mixed into every item's random stream (default 0).
        num_frames, image_size, shape_size, speed: clip geometry (defaults 8, 32, 10, 2).
        start: "random" (default), "edge", "cross" or "centre": where a shape starts (see
            :func:`sample_params`).

    ``ds[i]`` is ``dict(video=float32 [3,T,H,W] in [-1,1], text=caption, color=, shape=,
    direction=, seed=item seed, x0=, y0=)``.
    """

    def __init__(self, split: str = "train", length: int = 100_000, seed: int = 0,
                 num_frames: int = NUM_FRAMES, image_size: int = IMAGE_SIZE,
                 shape_size: int = SHAPE_SIZE, speed: int = SPEED, start: str = "random"):
        _check_choice("split", split, SPLITS)
        _check_choice("start", start, STARTS)
        if not isinstance(length, int) or not 1 <= length <= HELDOUT_SEED_OFFSET:
            raise ValueError(f"length={length!r} is out of range; accepted: an int in "
                             f"1..{HELDOUT_SEED_OFFSET}")
        for key, value in dict(num_frames=num_frames, image_size=image_size,
                               shape_size=shape_size, speed=speed).items():
            if not isinstance(value, int) or value < (0 if key == "speed" else 1):
                raise ValueError(f"{key}={value!r} is not accepted; accepted: a positive int")
        _start_range(1, num_frames, image_size, shape_size, speed)  # geometry must fit
        self.split, self.length, self.seed, self.start = split, length, int(seed), start
        self.geometry = dict(num_frames=num_frames, image_size=image_size,
                             shape_size=shape_size, speed=speed)

    def __len__(self) -> int:
        return self.length

    def item_seed(self, index: int) -> int:
        return index + (HELDOUT_SEED_OFFSET if self.split == "heldout" else 0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index={index} is out of range; accepted: 0..{self.length - 1}")
        seed = self.item_seed(index)
        p = sample_params(seed, self.seed, start=self.start, **self.geometry)
        video = render_clip(p["color"], p["shape"], p["direction"], p["x0"], p["y0"],
                            **self.geometry)
        return dict(video=to_tensor(video), text=caption_for(p["color"], p["shape"],
                                                              p["direction"]),
                    color=p["color"], shape=p["shape"], direction=p["direction"], seed=seed,
                    x0=p["x0"], y0=p["y0"])
