"""Measuring cache policies on one model with fixed inputs: benches, timing and memory, fidelity,
reports (``tools/benchmark.py``) and the per-step error study (``tools/analyze_error.py``)."""
