"""Samplers registered in SCHEDULERS."""
from .rflow import RFlow  # noqa: F401
