"""Names of the floating-point dtypes the package accepts in configs and on command lines."""
from __future__ import annotations

from typing import Any

import torch

#: the short names used by configs and flags (``dtype="bf16"``, ``--dtype fp16``)
SHORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: every accepted name: the short ones and torch's long ones
DTYPES = dict(SHORT_DTYPES, float32=torch.float32, float16=torch.float16,
              bfloat16=torch.bfloat16)


def resolve_dtype(dtype: Any, key: str = "dtype") -> torch.dtype:
    """A torch.dtype, or one of the names of :data:`DTYPES` -> torch.dtype.

    ``key`` names the setting in the error message."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"{key}={dtype!r} is not accepted; accepted: {sorted(DTYPES)} or a "
                         f"torch.dtype")
    return DTYPES[dtype]


__all__ = ["DTYPES", "SHORT_DTYPES", "resolve_dtype"]
