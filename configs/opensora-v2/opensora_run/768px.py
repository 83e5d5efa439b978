# Open-Sora 2.0 at 768px with the DuCa cache, on 8 GPUs with upstream's sequence parallelism
# (ColossalAI's HybridParallelPlugin, as upstream's configs/diffusion/inference/768px.py):
#   torchrun --nproc_per_node 8 --standalone scripts/diffusion/inference.py \
#       path/to/opensora_run/768px.py --save-dir samples --prompt "raining, sea"
# The booster swaps the blocks' processors and the model's forward after the wrapper attached
# the cache; the cache runs through both (tested on an upstream-shaped double). Policies that
# pick tokens (DuCa, ToCa) and the adaptive ones read whole latent rows per rank: under
# upstream's even split of the joint sequence they work per rank (see docs/opensora2.md).
_base_ = ["256px.py"]

sampling_option = dict(resolution="768px")

plugin = "hybrid"
plugin_config = dict(tp_size=1, pp_size=1, sp_size=8, sequence_parallelism_mode="ring_attn",
                     enable_sequence_parallelism=True, static_graph=True, zero_stage=2,
                     overlap_allgather=False)
plugin_ae = "hybrid"
plugin_config_ae = dict(tp_size=8, pp_size=1, sp_size=1, zero_stage=2, overlap_allgather=False)
