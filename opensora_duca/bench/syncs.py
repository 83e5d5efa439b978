"""Counting host-device synchronisations of a sampling run.

On CUDA, torch's sync debug mode reports every synchronising call (``.item()``, ``float()`` of
a device tensor, ``nonzero``, copies from pageable host memory, ...) and each report is
counted. A CPU has no device to wait for, so there the count is of the calls that would
synchronise on one: Python reads of a tensor's value (``item``, ``float`` / ``int`` / ``bool``,
``tolist``), ``torch.equal`` and ``nonzero`` (data-dependent output size).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

_READS = ("item", "tolist", "nonzero", "__float__", "__int__", "__bool__", "__index__")


class SyncCounter(contextlib.AbstractContextManager):
    """``with SyncCounter(device) as c: ...`` then ``c.count`` (and ``c.method``)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.count = 0
        self.method = ("torch.cuda.set_sync_debug_mode warnings" if self.device.type == "cuda"
                       else "Python reads of tensor values, torch.equal and nonzero (what "
                            "synchronises on a device)")
        self._undo = []

    def __enter__(self):
        if self.device.type == "cuda":
            self._warn = warnings.catch_warnings(record=True)
            self._log = self._warn.__enter__()
            warnings.simplefilter("always")
            torch.cuda.synchronize(self.device)
            torch.cuda.set_sync_debug_mode("warn")
            return self
        for name in _READS:
            self._patch(torch.Tensor, name)
        self._patch(torch, "equal")
        self._patch(torch, "nonzero")
        return self

    def _patch(self, owner, name):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)
        self._undo.append((owner, name, original, name in owner.__dict__))
        setattr(owner, name, counted)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._warn.__exit__(*exc)
            self.count = sum("synchroniz" in str(w.message) for w in self._log)
            return None
        for owner, name, original, own in reversed(self._undo):
            if own:
                setattr(owner, name, original)
            else:  # inherited (torch.Tensor's dunders live on its C base): drop the patch
                delattr(owner, name)
        self._undo = []
        return None
