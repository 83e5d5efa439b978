# For an EXISTING Open-Sora 1.3 checkout: run its own script with this config
#   torchrun --nproc_per_node 2 scripts/inference.py path/to/inference_duca.py --prompt "..."
# mmengine imports the plugin (custom_imports), which registers the "DuCa" wrapper into
# Open-Sora's MODELS registry; the wrapper builds upstream's 1.3 STDiT3 with the keyword
# arguments Open-Sora's script passes, attaches the cache and returns the patched model.
# Everything else is upstream's configs/opensora-v1-3/inference/t2v.py.
custom_imports = dict(imports=["opensora_duca.opensora_plugin"], allow_failed_imports=False)

num_frames = 113
fps = 24
frame_interval = 1
resolution = "720p"
aspect_ratio = "9:16"
save_dir = "./samples/samples_duca/"
multi_resolution = "STDiT2"
seed = 42
batch_size = 1
dtype = "bf16"

model = dict(
    type="DuCa",
    model=dict(type="STDiT3-XL/2", from_pretrained="hpcai-tech/OpenSora-STDiT-v4", qk_norm=True,
               enable_flash_attn=True, enable_layernorm_kernel=True, kernel_size=(8, 8, -1),
               use_spatial_rope=True, force_huggingface=True),
    cache=dict(type="DuCa"),
)
vae = dict(type="OpenSoraVAE_V1_3", from_pretrained="hpcai-tech/OpenSora-VAE-v1.3",
           z_channels=16, micro_batch_size=1, micro_batch_size_2d=4, micro_frame_size=17,
           use_tiled_conv3d=True, tile_size=4, normalization="video", temporal_overlap=True,
           force_huggingface=True)
text_encoder = dict(type="t5", from_pretrained="DeepFloyd/t5-v1_1-xxl", model_max_length=300)
scheduler = dict(type="rflow", use_timestep_transform=True, num_sampling_steps=30, cfg_scale=7.5,
                 use_oscillation_guidance=True, use_flaw_fix=True)
