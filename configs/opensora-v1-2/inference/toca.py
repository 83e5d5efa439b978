# Open-Sora 1.2 inference with ToCa token-wise caching in the DuCa harness: the same preset with
# conservative steps where DuCa is aggressive. ToCa's attention-map scorer needs the math
# backend: cache.scorer="attention" with model.attn_backend="math".
_base_ = ["sample.py"]
cache = dict(type="ToCa")
