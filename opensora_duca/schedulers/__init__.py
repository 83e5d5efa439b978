"""Samplers registered in SCHEDULERS."""
from .opensora2 import OpenSora2Sampler  # noqa: F401
from .rflow import RFlow  # noqa: F401
