"""TeaCache calibration: fit, on the model in use, the polynomial that maps the measured change
of the first block's modulated input to the change of the model output, and read the file the
fit is written to.

A few uncached runs record, per step i >= 1, x_i = relative L1 change of block 0's modulated
input from step i-1 (measured exactly as the TeaCache policy measures it, rank-invariant) and
y_i = relative L1 change of the model output (:func:`opensora_duca.cli.calibrate.collect_changes`,
the runs of ``tools/calibrate.py``); a least-squares polynomial fit y ~ p(x) of the chosen degree
gives the coefficients (highest degree first) that ``TeaCache(calibration=...)`` reads with
:func:`load_calibration` from the JSON file the tool writes.

(This module imports no cache manager: the TeaCache policy reads its file through it.)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np


def fit_polynomial(xs: Sequence[float], ys: Sequence[float], degree: int) -> Dict[str, object]:
    """Least-squares fit (numpy.polyfit) -> coefficients (highest degree first), RMSE, n."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"calibration samples: xs and ys must be equal-length lists, got "
                         f"{x.shape} and {y.shape}")
    if not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree={degree!r} is invalid; accepted: an integer >= 0")
    if len(x) <= degree:
        raise ValueError(f"calibration needs more than degree={degree} samples, got {len(x)}; "
                         f"add runs or steps")
    coeffs = np.polyfit(x, y, degree)
    rmse = float(np.sqrt(np.mean((np.polyval(coeffs, x) - y) ** 2)))
    return {"coefficients": [float(c) for c in coeffs], "degree": degree, "rmse": rmse,
            "samples": int(len(x))}


class CalibrationFileError(ValueError):
    """A calibration file that cannot be used; ``accepted`` says what is accepted."""

    def __init__(self, path, accepted: str):
        super().__init__(f"calibration={path!r} is invalid; accepted: {accepted}")
        self.path, self.accepted = path, accepted


def load_calibration(path: str) -> Tuple[Tuple[float, ...], Optional[Tuple[float, float]]]:
    """The ``coefficients`` (highest degree first) and the measured input range ``x_range``
    (None when the file has none) of a JSON file written by ``tools/calibrate.py``; raises
    :class:`CalibrationFileError`."""
    data = _read(path)
    coeffs, rng = data.get("coefficients"), data.get("x_range")
    if not isinstance(coeffs, list) or not coeffs or not all(_finite(c) for c in coeffs):
        raise CalibrationFileError(path, f"a non-empty 'coefficients' list of finite numbers "
                                         f"(got {_short(coeffs)})")
    if rng is not None and not (isinstance(rng, list) and len(rng) == 2
                                and all(_finite(x) for x in rng) and rng[0] <= rng[1]):
        raise CalibrationFileError(path, f"'x_range' None or [lo, hi] of finite numbers with "
                                         f"lo <= hi (got {_short(rng)})")
    return tuple(float(c) for c in coeffs), None if rng is None else (float(rng[0]),
                                                                       float(rng[1]))


def load_mag_ratios(path: str) -> Tuple[float, ...]:
    """MagCache's per-step magnitude ratios (``mag_ratios``, step 0 first, all finite and
    positive) of a JSON file written by ``tools/calibrate.py --policy MagCache``; raises
    :class:`CalibrationFileError`."""
    ratios = _read(path).get("mag_ratios")
    if not isinstance(ratios, list) or len(ratios) < 2 or not all(
            _finite(r) and r > 0 for r in ratios):
        raise CalibrationFileError(path, f"a 'mag_ratios' list of at least 2 finite positive "
                                         f"numbers, written by tools/calibrate.py --policy "
                                         f"MagCache (got {_short(ratios)})")
    return tuple(float(r) for r in ratios)


def magnitude_ratios(ratios: Sequence[Sequence[float]]) -> list:
    """MagCache's curve from uncached runs: ``ratios[r][i]`` is, for clip r, the mean over
    tokens of ``||residual_i|| / ||residual_(i-1)||`` (per-token L2 norms of the trunk's
    residual, output minus input) at step i >= 1 (``ratios[r][0]`` is ignored). The curve is
    1.0 at step 0, then the mean over clips."""
    steps = len(ratios[0])
    if steps < 2 or any(len(r) != steps for r in ratios):
        raise ValueError("magnitude ratios: every clip needs the same number (>= 2) of steps")
    return [1.0] + [float(np.mean([r[i] for r in ratios])) for i in range(1, steps)]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:80] + "..."


def _read(path) -> dict:
    if not isinstance(path, str) or not os.path.isfile(path):
        raise CalibrationFileError(path, "the path of a JSON file written by tools/calibrate.py")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise CalibrationFileError(path, f"a JSON file written by tools/calibrate.py "
                                         f"({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise CalibrationFileError(path, "a JSON object written by tools/calibrate.py")
    return data


def model_identity(model) -> Dict[str, object]:
    """What identifies a model's weights for a calibration file: its class, its parameter
    count, the sha256 of its parameter names and shapes, and the sha256 of the first 64 values
    of every parameter rounded to bf16 (so an fp32 and a bf16 copy of one checkpoint agree;
    cheap: a few values per tensor leave the device)."""
    import torch

    names, sample = hashlib.sha256(), hashlib.sha256()
    count = 0
    for name, p in model.named_parameters():
        count += p.numel()
        names.update(f"{name}:{tuple(p.shape)};".encode())
        head = p.detach().reshape(-1)[:64].to("cpu", torch.bfloat16).view(torch.int16)
        sample.update(head.numpy().tobytes())
    return {"type": type(model).__name__, "parameters": count,
            "shapes": names.hexdigest()[:16], "weights": sample.hexdigest()[:16]}


def check_calibration_model(policy, model) -> None:
    """A policy's calibration file (``policy.calibration``, when set) must have been fitted on
    ``model``: the file's ``model`` record (written by tools/calibrate.py) must equal
    :func:`model_identity`; a file without one is accepted (written before it was recorded).
    Raises a one-line ``ValueError``."""
    path = getattr(policy, "calibration", None)
    if path is None:
        return
    recorded = _read(path).get("model")
    if recorded is None:
        return
    actual = model_identity(model)
    if recorded != actual:
        diff = [k for k in actual if not isinstance(recorded, dict) or recorded.get(k) != actual[k]]
        raise ValueError(f"{getattr(policy, 'name', 'cache')} calibration={path!r} was fitted on "
                         f"another model (differs in {', '.join(diff)}: file {recorded!r}, this "
                         f"model {actual!r}); accepted: a file tools/calibrate.py wrote for "
                         f"this model")


__all__ = ["fit_polynomial", "load_calibration", "load_mag_ratios", "magnitude_ratios",
           "CalibrationFileError", "model_identity", "check_calibration_model"]
