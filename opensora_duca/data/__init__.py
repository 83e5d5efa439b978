"""Datasets (registered in ``opensora_duca.registry.DATASETS``)."""
from . import synthetic  # noqa: F401  (registers SyntheticShapes)
from .synthetic import SyntheticShapes, caption_set, VOCABULARY  # noqa: F401
