"""The token scorers a token-subset step can rank tokens by (the scores themselves are computed
by the block runner and :mod:`opensora_duca.cache.selection`)."""
from __future__ import annotations

from ..plan import _Name


class Scorer(_Name):
    """How a token-subset step ranks tokens (highest first)."""

    VNORM = "vnorm"            # sum over heads of (1 - ||v||), from the last full self-attention
    RANDOM = "random"          # uniform, drawn for the global token grid
    ATTENTION = "attention"    # attention received (needs the 'math' attention backend)
    SIMILARITY = "similarity"  # 1 - cosine(block input, block input at the last full MLP)
    NORM = "norm"              # L2 norm of the block input


__all__ = ["Scorer"]
