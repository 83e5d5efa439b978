# A tiny random-weight Open-Sora 2.0 run that finishes in seconds on a CPU (smoke tests,
# examples): the CPU-sized MMDiT (MMDiT-cpu: hidden 64, 2 double + 2 single blocks, the
# published layout), the weight-free hashed text pair in place of T5 / CLIP and the
# weight-free causal codec with the HunyuanVideo VAE's latent layout (16 channels, 4x
# temporal, 8x spatial). Same keys as 256px.py.
save_dir = "./samples/opensora-v2-tiny/"
seed = 42
batch_size = 1
dtype = "fp32"

cond_type = "t2v"
prompt = ["a red circle moving left", "a blue square staying still"]

sampling_option = dict(
    height=64,
    width=64,
    num_frames=9,  # 3 latent frames (causal: (9 - 1) // 4 + 1)
    num_steps=6,
    shift=True,
    temporal_reduction=4,
    is_causal_vae=True,
    guidance=7.5,
    guidance_img=3.0,
    text_osci=True,
    image_osci=True,
    scale_temporal_osci=True,
    method="i2v",
    seed=None,  # None: the noise of prompt i is seeded with seed + i
)
motion_score = "4"
fps_save = 8

model = dict(type="MMDiT-cpu")  # in_channels 64 = 16 x 2 x 2, context / vec width 32
ae = dict(type="tiny_causal_vae")
t5 = dict(type="hashed_text_embedder", dim=32, max_length=16)
clip = dict(type="hashed_text_embedder", dim=32, pooled=True)
# cache = dict(type="DuCa")  # uncomment to sample with DuCa feature caching
