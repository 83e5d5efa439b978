# Open-Sora 1.2 inference with FORA: every block's attention / cross-attention / MLP outputs are
# computed every `interval` steps and reused in between.
_base_ = ["sample.py"]
cache = dict(type="FORA", interval=3)
