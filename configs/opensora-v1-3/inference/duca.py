# Open-Sora 1.3 inference with DuCa dual feature caching (the released Open-Sora preset; every
# field is optional, see configs/opensora-v1-2/inference/duca.py for the full list).
_base_ = ["sample.py"]
cache = dict(type="DuCa")
