"""Fidelity of cached generations against the uncached reference (same prompt, same seed).

Protocol (the caching papers'; described in ``docs/evaluation.md``):

* frames are floats in ``[0, 1]`` (inputs are divided by ``data_range``);
* PSNR per frame: ``10 * log10(1 / MSE)`` with the MSE over ``C x H x W``; 100 when ``MSE < 1e-10``;
* SSIM per frame and channel: Gaussian window 11, sigma 1.5, ``C1 = 0.01**2``, ``C2 = 0.03**2``,
  statistics over the valid region only (no padding, i.e. 5 pixels lost at each border), the SSIM
  map averaged, then averaged over channels;
* aggregation: average over videos per frame index, then over frame indices;
* LPIPS (AlexNet, inputs in ``[-1, 1]``, spatial mean) is optional: it needs the ``lpips`` package
  and the AlexNet backbone weights in the torch hub cache; when either is missing the value is
  ``None`` and a message names what is missing.

All metric arithmetic is done with torch in float64.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

PSNR_MAX = 100.0
MSE_EPS = 1e-10
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm")

_LAYOUTS = ("TCHW", "CTHW", "THWC", "BTCHW", "BCTHW", "BTHWC")


# --------------------------------------------------------------------------------------------------
# input normalisation
# --------------------------------------------------------------------------------------------------
def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu")
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(f"expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def to_btchw(x, layout: Optional[str] = None, data_range: float = 1.0) -> torch.Tensor:
    """Return ``x`` as float64 ``[B, T, C, H, W]`` scaled so that ``data_range`` maps to 1.

    ``layout`` is one of ``TCHW, CTHW, THWC, BTCHW, BCTHW, BTHWC``; by default a 4-D input is
    ``TCHW`` (one video) and a 5-D input ``BTCHW`` (a batch of videos). For final latents of
    Open-Sora (``[B, C, T, H, W]``) pass ``layout="BCTHW"`` and an explicit ``data_range``.
    """
    t = _as_tensor(x)
    if layout is None:
        layout = {4: "TCHW", 5: "BTCHW"}.get(t.dim())
        if layout is None:
            raise ValueError(
                f"frames must be 4-D [T,C,H,W] or 5-D [B,T,C,H,W] (or pass layout=one of "
                f"{_LAYOUTS}); "
                f"got shape {tuple(t.shape)}"
            )
    layout = layout.upper()
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; accepted: {_LAYOUTS}")
    if t.dim() != len(layout):
        raise ValueError(
            f"layout {layout} needs a {len(layout)}-D input, got shape {tuple(t.shape)}"
        )
    if len(layout) == 4:
        layout = "B" + layout
        t = t.unsqueeze(0)
    perm = [layout.index(c) for c in "BTCHW"]
    t = t.permute(*perm).to(torch.float64)
    if not (isinstance(data_range, (int, float)) and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    if data_range != 1.0:
        t = t / float(data_range)
    return t


def _pair(a, b, layout, data_range) -> Tuple[torch.Tensor, torch.Tensor]:
    ta = to_btchw(a, layout, data_range)
    tb = to_btchw(b, layout, data_range)
    if ta.shape != tb.shape:
        raise ValueError(f"shape mismatch: {tuple(ta.shape)} vs {tuple(tb.shape)} (as [B,T,C,H,W])")
    return ta, tb


def uint8_video_to_frames(video: np.ndarray) -> torch.Tensor:
    """``uint8 [T, H, W, 3]`` -> float64 ``[T, 3, H, W]`` in ``[0, 1]``."""
    if not (isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.ndim == 4):
        raise ValueError(
            f"expected uint8 [T,H,W,C], got {getattr(video, 'dtype', None)} "
            f"{getattr(video, 'shape', None)}"
        )
    return torch.from_numpy(video).permute(0, 3, 1, 2).to(torch.float64) / 255.0


# --------------------------------------------------------------------------------------------------
# per-frame metrics (inputs already float64 [N, C, H, W] in [0, 1])
# --------------------------------------------------------------------------------------------------
def psnr_per_frame(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR of each frame of float64 ``[N, C, H, W]`` tensors in [0, 1] -> ``[N]``."""
    mse = ((a - b) ** 2).flatten(1).mean(dim=1)
    out = torch.full_like(mse, PSNR_MAX)
    ok = mse >= MSE_EPS
    out[ok] = 10.0 * torch.log10(1.0 / mse[ok])
    return out


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian (float64); the 2-D window is its outer product."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over the last two axes, valid region only (no padding).

    Written as 2 x 11 shifted in-place multiply-adds: on CPU this is several times faster than
    ``conv2d`` in float64 and gives the same numbers."""
    w = g.tolist()
    k = len(w)
    h_out = x.shape[-2] - k + 1
    y = x[..., 0:h_out, :] * w[0]
    for i in range(1, k):
        y.add_(x[..., i : i + h_out, :], alpha=w[i])
    w_out = x.shape[-1] - k + 1
    z = y[..., 0:w_out] * w[0]
    for i in range(1, k):
        z.add_(y[..., i : i + w_out], alpha=w[i])
    return z


def ssim_per_frame(a: torch.Tensor, b: torch.Tensor, chunk: int = 8, device=None) -> torch.Tensor:
    """SSIM of each frame of float64 ``[N, C, H, W]`` tensors in [0, 1] -> ``[N]`` (channel mean).

    ``device`` (e.g. ``"cuda"``) moves each chunk there for the arithmetic (still float64)."""
    n, c, h, w = a.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    g = gaussian_window()
    out = []
    for s in range(0, n, chunk):
        x = a[s : s + chunk].reshape(-1, h, w).to(device=device, dtype=torch.float64)
        y = b[s : s + chunk].reshape(-1, h, w).to(device=device, dtype=torch.float64)
        mu_x = _filter_valid(x, g)
        mu_y = _filter_valid(y, g)
        sxx = _filter_valid(x * x, g) - mu_x * mu_x
        syy = _filter_valid(y * y, g) - mu_y * mu_y
        sxy = _filter_valid(x * y, g) - mu_x * mu_y
        num = (2 * mu_x * mu_y + SSIM_C1) * (2 * sxy + SSIM_C2)
        den = (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (sxx + syy + SSIM_C2)
        per_channel = (num / den).flatten(1).mean(dim=1)  # [chunk*C]
        out.append(per_channel.view(-1, c).mean(dim=1).cpu())
    return torch.cat(out)


def aggregate_per_frame(per_video: Sequence[Sequence[float]]) -> Optional[float]:
    """Average over videos per frame index (videos may differ in length: each frame index averages
    the videos that have it), then over frame indices."""
    per_video = [list(v) for v in per_video if len(v) > 0]
    if not per_video:
        return None
    t_max = max(len(v) for v in per_video)
    per_index = []
    for t in range(t_max):
        vals = [v[t] for v in per_video if len(v) > t]
        per_index.append(sum(vals) / len(vals))
    return float(sum(per_index) / len(per_index))


def _aggregate_batch(values: torch.Tensor) -> float:
    # values: [B, T] -> mean over B per frame, then over T
    return float(values.mean(dim=0).mean().item())


# --------------------------------------------------------------------------------------------------
# in-memory API
# --------------------------------------------------------------------------------------------------
def psnr(a, b, data_range: float = 1.0, layout: Optional[str] = None) -> float:
    """PSNR between two videos / batches of videos (see :func:`to_btchw` for layouts).

    ``data_range`` is the span of the value range (1 for [0, 1] frames, 2 for [-1, 1], 255 for
    uint8); inputs are divided by it before the ``[0, 1]`` formula is applied."""
    ta, tb = _pair(a, b, layout, data_range)
    bsz, t = ta.shape[:2]
    vals = psnr_per_frame(ta.flatten(0, 1), tb.flatten(0, 1)).view(bsz, t)
    return _aggregate_batch(vals)


def ssim(a, b, data_range: float = 1.0, layout: Optional[str] = None, device=None) -> float:
    """SSIM between two videos / batches of videos (frames per channel, valid region)."""
    ta, tb = _pair(a, b, layout, data_range)
    bsz, t = ta.shape[:2]
    vals = ssim_per_frame(ta.flatten(0, 1), tb.flatten(0, 1), device=device).view(bsz, t)
    return _aggregate_batch(vals)


def mse(a, b, data_range: float = 1.0, layout: Optional[str] = None) -> float:
    """Plain mean squared error after scaling by ``data_range`` (all elements)."""
    ta, tb = _pair(a, b, layout, data_range)
    return float(((ta - tb) ** 2).mean().item())


# --------------------------------------------------------------------------------------------------
# LPIPS (optional)
# --------------------------------------------------------------------------------------------------
def lpips_status() -> Tuple[bool, str]:
    """Whether LPIPS (AlexNet) can run offline, and a message saying why not."""
    import importlib.util

    if importlib.util.find_spec("lpips") is None:
        return False, "LPIPS unavailable: the `lpips` package is not installed (pip install lpips)"
    weights = os.path.join(torch.hub.get_dir(), "checkpoints", ALEXNET_WEIGHTS)
    if not os.path.isfile(weights):
        return False, (
            f"LPIPS unavailable: AlexNet backbone weights not found at {weights} "
            "(the lpips package ships only its linear heads; place the torchvision AlexNet "
            "checkpoint there or set TORCH_HOME)"
        )
    return True, f"LPIPS (alex) with backbone {weights}"


class LPIPSMetric:
    """Lazily-built LPIPS(alex) model; ``__call__`` returns per-frame distances."""

    def __init__(self, device: str = "cpu"):
        ok, msg = lpips_status()
        if not ok:
            raise RuntimeError(msg)
        from opensora_duca.eval.vbench import ensure_torchvision_importable

        ensure_torchvision_importable()
        import lpips  # noqa: WPS433

        self.device = torch.device(device)
        self.model = lpips.LPIPS(net="alex", verbose=False).to(self.device).eval()

    @torch.no_grad()
    def per_frame(self, a: torch.Tensor, b: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """a, b: float64 [N, C, H, W] in [0, 1] -> [N] LPIPS distances."""
        out = []
        for s in range(0, a.shape[0], chunk):
            x = (a[s : s + chunk].float() * 2 - 1).to(self.device)
            y = (b[s : s + chunk].float() * 2 - 1).to(self.device)
            out.append(self.model(x, y).flatten().double().cpu())
        return torch.cat(out)


def lpips_distance(
    a, b, data_range: float = 1.0, layout: Optional[str] = None, device: str = "cpu"
):
    """LPIPS between two videos / batches; returns ``(value or None, message)``."""
    ok, msg = lpips_status()
    if not ok:
        return None, msg
    ta, tb = _pair(a, b, layout, data_range)
    bsz, t = ta.shape[:2]
    vals = LPIPSMetric(device).per_frame(ta.flatten(0, 1), tb.flatten(0, 1)).view(bsz, t)
    return _aggregate_batch(vals), msg


def compare_videos(a, b, data_range: float = 1.0, layout: Optional[str] = None) -> Dict[str, float]:
    """PSNR and SSIM of two in-memory videos / batches in one call."""
    return {"psnr": psnr(a, b, data_range, layout), "ssim": ssim(a, b, data_range, layout)}


# --------------------------------------------------------------------------------------------------
# directory comparison
# --------------------------------------------------------------------------------------------------
def _scan(folder: str) -> Tuple[Dict[str, str], List[str], List[str]]:
    """Return ({name: path} for video files, [temporary files of writes], [other files])."""
    from ..utils.atomic import is_temp_name

    videos, partial, other = {}, [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if is_temp_name(name):
            partial.append(name)
        elif os.path.splitext(name)[1].lower() in VIDEO_EXTS:
            videos[name] = path
        else:
            other.append(name)
    return videos, partial, other


def compare_dirs(a_dir: str, b_dir: str, use_lpips: bool = False, device: str = "cpu") -> dict:
    """Compare videos (``device`` is used for SSIM and LPIPS) of ``b_dir`` against the references in
    ``a_dir``, matched by file name.

    Returns a dict with ``matched``, ``only_in_a``, ``only_in_b``, ``unreadable`` (``{"name",
    "dir", "error"}``), ``mismatched`` (pairs with different frame shapes/counts: compared over the
    common frames only when the frame size agrees, else not compared), ``ignored_partial`` and
    ``ignored_other`` (non-video files), ``per_video`` (``{name: {"psnr", "ssim", "lpips",
    "num_frames"}}``), ``aggregate`` (per-frame-index aggregation over the compared videos),
    ``num_compared`` and ``lpips_message``. Nothing is skipped silently.
    """
    from opensora_duca.utils.video import read_video

    for d in (a_dir, b_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"not a directory: {d}")
    va, pa, oa = _scan(a_dir)
    vb, pb, ob = _scan(b_dir)
    matched = sorted(set(va) & set(vb))
    result = {
        "a_dir": os.path.abspath(a_dir),
        "b_dir": os.path.abspath(b_dir),
        "matched": matched,
        "only_in_a": sorted(set(va) - set(vb)),
        "only_in_b": sorted(set(vb) - set(va)),
        "unreadable": [],
        "mismatched": [],
        "ignored_partial": [os.path.join(a_dir, n) for n in pa]
        + [os.path.join(b_dir, n) for n in pb],
        "ignored_other": [os.path.join(a_dir, n) for n in oa]
        + [os.path.join(b_dir, n) for n in ob],
        "per_video": {},
        "aggregate": {"psnr": None, "ssim": None, "lpips": None},
        "num_compared": 0,
        "lpips_message": None,
    }

    lp = None
    if use_lpips:
        ok, msg = lpips_status()
        result["lpips_message"] = msg
        if ok:
            try:
                lp = LPIPSMetric(device)
            except Exception as e:  # report, never hide
                result["lpips_message"] = f"LPIPS unavailable: {type(e).__name__}: {e}"
                lp = None

    series = {"psnr": [], "ssim": [], "lpips": []}
    for name in matched:
        frames = {}
        for side, path, folder in (("a", va[name], a_dir), ("b", vb[name], b_dir)):
            try:
                frames[side] = read_video(path)
            except Exception as e:
                result["unreadable"].append(
                    {
                        "name": name,
                        "dir": os.path.abspath(folder),
                        "error": f"{type(e).__name__}: {e}",
                    }
                )
        if len(frames) != 2:
            continue
        fa, fb = frames["a"], frames["b"]
        if fa.shape[1:] != fb.shape[1:]:
            result["mismatched"].append(
                {
                    "name": name,
                    "a_shape": list(fa.shape),
                    "b_shape": list(fb.shape),
                    "compared": False,
                }
            )
            continue
        if fa.shape[0] != fb.shape[0]:
            t = min(fa.shape[0], fb.shape[0])
            result["mismatched"].append(
                {
                    "name": name,
                    "a_shape": list(fa.shape),
                    "b_shape": list(fb.shape),
                    "compared": True,
                    "note": f"compared over the first {t} frames",
                }
            )
            fa, fb = fa[:t], fb[:t]
        ta, tb = uint8_video_to_frames(fa), uint8_video_to_frames(fb)
        p = psnr_per_frame(ta, tb).tolist()
        s = ssim_per_frame(ta, tb, device=None if device == "cpu" else device).tolist()
        entry = {
            "psnr": float(np.mean(p)),
            "ssim": float(np.mean(s)),
            "lpips": None,
            "num_frames": len(p),
        }
        series["psnr"].append(p)
        series["ssim"].append(s)
        if lp is not None:
            lp_frames = lp.per_frame(ta, tb).tolist()
            entry["lpips"] = float(np.mean(lp_frames))
            series["lpips"].append(lp_frames)
        result["per_video"][name] = entry
    result["num_compared"] = len(result["per_video"])
    for k in ("psnr", "ssim", "lpips"):
        result["aggregate"][k] = aggregate_per_frame(series[k])
    return result


__all__ = [
    "psnr",
    "ssim",
    "mse",
    "compare_videos",
    "lpips_distance",
    "lpips_status",
    "LPIPSMetric",
    "psnr_per_frame",
    "ssim_per_frame",
    "gaussian_window",
    "aggregate_per_frame",
    "to_btchw",
    "uint8_video_to_frames",
    "compare_dirs",
]
