# configs/opensora-v1-2/inference/duca.py with a small random-weight model, the demo text
# encoder and the demo codec, so the DuCa path runs end to end on a CPU in seconds:
#   torchrun --nproc_per_node 2 tools/inference.py configs/tiny/duca.py
_base_ = ["../opensora-v1-2/inference/duca.py"]
image_size = (32, 32)
num_frames = 8
fps = 8
save_fps = 8
dtype = "fp32"
save_dir = "./samples/tiny_duca/"
aes = None
prompt = ["a red circle moving left", "a blue square staying still"]
model = dict(_delete_=True, type="STDiT3-S/2", depth=2, hidden_size=64, num_heads=4)
vae = dict(_delete_=True, type="DemoCodec")
text_encoder = dict(_delete_=True, type="DemoTextEncoder", output_dim=32, model_max_length=8)
scheduler = dict(use_timestep_transform=False)
