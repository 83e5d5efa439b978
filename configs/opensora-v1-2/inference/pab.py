# Open-Sora 1.2 inference with pyramid attention broadcast (Open-Sora defaults: spatial 2,
# temporal 4, cross 6, inside timesteps (450, 930)).
_base_ = ["sample.py"]
cache = dict(type="PAB", spatial_range=2, temporal_range=4, cross_range=6,
             timestep_window=(450, 930))
