# Open-Sora 1.3 inference with FORA: every module recomputed every `interval` steps.
_base_ = ["sample.py"]
cache = dict(type="FORA", interval=3)
