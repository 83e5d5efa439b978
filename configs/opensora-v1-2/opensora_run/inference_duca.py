# For an EXISTING Open-Sora 1.2 checkout: run its own script with this config
#   torchrun --nproc_per_node 2 scripts/inference.py path/to/inference_duca.py --prompt "..."
# mmengine imports the plugin (custom_imports), which registers the "DuCa" wrapper into
# Open-Sora's MODELS registry; the wrapper builds the inner STDiT3 with the keyword arguments
# Open-Sora's script passes, attaches the cache and returns the patched model.
# Requires: pip install opensora_duca (next to Open-Sora); nothing else changes.
custom_imports = dict(imports=["opensora_duca.opensora_plugin"], allow_failed_imports=False)

resolution = "480p"
aspect_ratio = "9:16"
num_frames = 51
fps = 24
frame_interval = 1
save_fps = 24
save_dir = "./samples/samples_duca/"
seed = 42
batch_size = 1
multi_resolution = "STDiT2"
dtype = "bf16"
condition_frame_length = 5
align = 5

model = dict(
    type="DuCa",
    model=dict(type="STDiT3-XL/2", from_pretrained="hpcai-tech/OpenSora-STDiT-v3", qk_norm=True,
               enable_flash_attn=True, enable_layernorm_kernel=True),
    cache=dict(type="DuCa"),
)
vae = dict(type="OpenSoraVAE_V1_2", from_pretrained="hpcai-tech/OpenSora-VAE-v1.2",
           micro_frame_size=17, micro_batch_size=4)
text_encoder = dict(type="t5", from_pretrained="DeepFloyd/t5-v1_1-xxl", model_max_length=300)
scheduler = dict(type="rflow", use_timestep_transform=True, num_sampling_steps=30, cfg_scale=7.0)
aes = 6.5
flow = None
