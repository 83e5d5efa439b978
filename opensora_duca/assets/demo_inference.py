# The embedded demo model: a small STDiT3 trained here on synthetic moving shapes
# (configs/demo/train.py), 8 frames of 32x32 RGB, DuCa caching on.
#   python tools/inference.py configs/demo/inference.py --prompt "a red circle moving left"
#   torchrun --nproc_per_node 2 tools/demo.py configs/demo/inference.py     (make demo)
num_frames = 8
image_size = (32, 32)
fps = 8
save_fps = 8
save_dir = "./samples/demo"
seed = 42
batch_size = 4
dtype = "fp32"
prompt = ["a red circle moving left", "a blue square moving up",
          "a yellow triangle moving right", "a green circle staying still"]

_ckpt = "{{ fileDirname }}/../../opensora_duca/assets/demo_stdit3.safetensors"
model = dict(type="STDiT3-demo", from_pretrained=_ckpt)
text_encoder = dict(type="DemoTextEncoder", output_dim=64, model_max_length=12,
                    from_pretrained=_ckpt)
vae = dict(type="DemoCodec")
scheduler = dict(type="rflow", num_sampling_steps=30, cfg_scale=4.0)
aes = None
flow = None

cache = dict(type="DuCa")  # the released Open-Sora preset; set to None for uncached sampling
# tools/demo.py (make demo) also runs these, next to DuCa: the frontier's 6x point on this model
# (FORA with first-order forecasting, its 5 computed steps of 30 placed by a probe on seed 9;
# docs/results/frontier.json, docs/frontier.md); schedule_steps: a run with another number of
# steps (--num-sampling-steps) computes the same fractions of it
compare_caches = {"FORA+forecast": dict(type="FORA", schedule=[0, 6, 13, 20, 26],
                                        schedule_steps=30, forecast=dict(order=1))}
