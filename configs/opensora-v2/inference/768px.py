# Open-Sora 2.0 text-to-video at 768px (upstream's configs/diffusion/inference/768px.py):
# 256px.py at resolution 768px (16:9: 576 x 1024). Upstream also adds plugins/sp.py
# (ColossalAI sequence parallelism over 8 GPUs); this tool runs Open-Sora 2.0 on one process.
_base_ = ["256px.py"]

sampling_option = dict(
    resolution="768px",
)
