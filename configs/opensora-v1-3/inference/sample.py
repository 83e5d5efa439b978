# Open-Sora 1.3 text-to-video inference (the values of upstream's
# configs/opensora-v1-3/inference/t2v.py at tag v1.3).
# The weights are not downloaded at run time: download OpenSora-STDiT-v4, OpenSora-VAE-v1.3 and
# T5-v1.1-XXL first and point the paths below (or --cfg-options model.from_pretrained=DIR ...)
# at the local copies. Add `cache = dict(type="DuCa")` to cache (see duca.py).
resolution = "720p"
aspect_ratio = "9:16"
num_frames = 113
fps = 24
frame_interval = 1
save_fps = 24

save_dir = "./samples/samples/"
seed = 42
batch_size = 1
multi_resolution = "STDiT2"
dtype = "bf16"

model = dict(
    type="STDiT3-XL/2",
    from_pretrained="hpcai-tech/OpenSora-STDiT-v4",
    in_channels=16,            # upstream 1.3's default
    cond_embedders=True,       # every 1.3 model has x_embedder_cond / x_embedder_cond_mask
    qk_norm=True,
    enable_flash_attn=True,
    enable_layernorm_kernel=True,
    kernel_size=(8, 8, -1),    # window attention in the temporal blocks (rows, columns, frames)
    use_spatial_rope=True,
    force_huggingface=True,    # upstream loads the HF folder; here the local folder is read
)
vae = dict(
    type="OpenSoraVAE_V1_3",
    from_pretrained="hpcai-tech/OpenSora-VAE-v1.3",
    z_channels=16,
    micro_batch_size=1,
    micro_batch_size_2d=4,
    micro_frame_size=17,
    use_tiled_conv3d=True,
    tile_size=4,
    normalization="video",
    temporal_overlap=True,
    force_huggingface=True,
)
text_encoder = dict(
    type="t5",
    from_pretrained="DeepFloyd/t5-v1_1-xxl",
    model_max_length=300,
)
scheduler = dict(
    type="rflow",
    use_timestep_transform=True,
    transform_version="1.3",   # 1.3's frame count (num_frames - 1) // 4
    num_sampling_steps=30,
    cfg_scale=7.5,
    use_oscillation_guidance=True,
    use_flaw_fix=True,
)
