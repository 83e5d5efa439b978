# Open-Sora 1.2 inference with DuCa dual feature caching (the released Open-Sora preset).
# Every field is optional; the values below are the defaults (see opensora_duca/cache/policies.py).
_base_ = ["sample.py"]
cache = dict(
    type="DuCa",
    warmup_steps=3,                      # steps 0-2 fully computed
    cycles=dict(spatial_attn=3, temporal_attn=3, cross_attn=6, mlp=3),
    fresh_ratio=0.1,                     # x ratio_factors.mlp 1.495 -> ~15% of tokens
    ratio_factors=dict(mlp=1.495),
    ratio_schedule=dict(type="constant"),
    scorer="vnorm",                      # value-vector norms: works with fused attention
    staleness_bonus=0.25,
    cfg_shared_selection=False,          # cond / uncond halves select separately (released code)
    stored_dtype=None,                   # model dtype
    final_step="plan",
)
