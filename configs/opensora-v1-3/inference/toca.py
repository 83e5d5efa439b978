# Open-Sora 1.3 inference with ToCa token-wise caching (conservative steps where DuCa is
# aggressive).
_base_ = ["sample.py"]
cache = dict(type="ToCa")
