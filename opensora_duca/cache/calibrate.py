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

import json
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
    if not isinstance(path, str) or not os.path.isfile(path):
        raise CalibrationFileError(path, "the path of a JSON file written by tools/calibrate.py")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        coeffs = tuple(float(c) for c in data["coefficients"])
        rng = data.get("x_range")
        rng = None if rng is None else (float(rng[0]), float(rng[1]))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise CalibrationFileError(path, f"a JSON file with a 'coefficients' list ({err})")
    if not coeffs:
        raise CalibrationFileError(path, "a non-empty 'coefficients' list")
    return coeffs, rng


__all__ = ["fit_polynomial", "load_calibration", "CalibrationFileError"]
