# A tiny random-weight text-to-video run that finishes in seconds on a CPU (smoke tests,
# examples). Same keys as configs/opensora-v1-2/inference/sample.py.
image_size = (32, 32)  # (H, W); wins over resolution / aspect_ratio
num_frames = 8
fps = 8
save_fps = 8
save_dir = "./samples/tiny/"
seed = 42
batch_size = 2
dtype = "fp32"

prompt = ["a red circle moving left", "a blue square staying still"]

model = dict(type="STDiT3-S/2", depth=2, hidden_size=64, num_heads=4)
vae = dict(type="DemoCodec")  # weight-free space-to-depth: [3, 8, 32, 32] <-> [12, 8, 16, 16]
text_encoder = dict(type="DemoTextEncoder", output_dim=32, model_max_length=8)
# scale_temporal=False: the transform counts the video as one frame (8 frames have the 1.2
# frame factor 8 // 17 * 5 = 0, which upstream turns into a NaN timestep and rflow refuses)
scheduler = dict(type="rflow", use_timestep_transform=True, scale_temporal=False,
                 num_sampling_steps=10, cfg_scale=7.0)

aes = None
flow = None
# cache = dict(type="DuCa")  # uncomment to sample with DuCa feature caching
