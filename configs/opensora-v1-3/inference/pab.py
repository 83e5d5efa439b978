# Open-Sora 1.3 inference with pyramid attention broadcast (Open-Sora's defaults).
_base_ = ["sample.py"]
cache = dict(type="PAB", spatial_range=2, temporal_range=4, cross_range=6,
             timestep_window=(450, 930))
