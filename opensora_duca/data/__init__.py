"""Datasets (registered in ``opensora_duca.registry.DATASETS``)."""
from . import synthetic  # noqa: F401  (registers SyntheticShapes)
from .synthetic import VOCABULARY, SyntheticShapes, caption_set  # noqa: F401
