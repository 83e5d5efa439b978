"""The lean base step: fused element-wise work (modulation, gating, rotary, qk-RMSNorm) gives
the results of the unfused formulas -- fp32 to rounding, bf16 no less accurate against a
float64 run -- the rotary tables are rebuilt whenever they must be, the residual stream is
token-major, and a block's element-wise operator count stays at its lean level."""
from __future__ import annotations

import pytest
import reference_impl as ref
import torch
import torch.nn.functional as F

from opensora_duca.bench.profile import classify, count_ops, first_model_call, profile_call
from opensora_duca.models import layers, stdit3
from opensora_duca.models.stdit3 import STDiT3

# ----------------------------------------------------------- the unfused formulas (as before)


def naive_modulate(x, shift, scale):
    return x * (1 + scale) + shift


def naive_gated_add(x, gate, h, drop_path=None):
    return x + gate * h


def naive_rotate(self, x, seq_dim=-2):
    """Rotation computed in float32 from fresh angles, with a stacked (-x_odd, x_even) copy."""
    n = x.shape[seq_dim]
    pos = torch.arange(n, dtype=torch.float32)
    ang = (pos[:, None] * self.freqs.float()[None]).repeat_interleave(2, dim=-1)
    xf = x.float()
    rot = torch.stack((-xf[..., 1::2], xf[..., 0::2]), dim=-1).flatten(-2)
    return (xf * ang.cos() + rot * ang.sin()).to(x.dtype)


def naive_rms(self, x):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * xf.to(x.dtype)


@pytest.fixture
def unfused(monkeypatch):
    """Patch the unfused formulas in; a model built afterwards runs them."""
    monkeypatch.setattr(stdit3, "modulate", naive_modulate)
    monkeypatch.setattr(stdit3, "gated_add", naive_gated_add)
    monkeypatch.setattr(layers, "modulate", naive_modulate)
    monkeypatch.setattr(layers.RotaryEmbedding, "rotate_queries_or_keys", naive_rotate)
    monkeypatch.setattr(layers.LlamaRMSNorm, "forward", naive_rms)


def make_model(seed=0):
    torch.manual_seed(seed)
    m = STDiT3(in_channels=4, hidden_size=64, depth=2, num_heads=4, caption_channels=16,
               model_max_length=6, input_sq_size=64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial modulation tables and norms
        for name, p in m.named_parameters():
            if name != "rope.freqs" and ("scale_shift_table" in name or "norm" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "norm" in name
                                                                   else 0.0))
    return m.eval()


def model_inputs(seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    z = torch.randn(2, 4, 5, 12, 10, generator=g)
    y = torch.randn(2, 1, 6, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    return z, torch.tensor([700.0, 300.0]), y, mask


def run(model, dtype, inputs):
    z, t, y, mask = inputs
    with torch.no_grad():
        return model.to(dtype)(z.to(dtype), t, y.to(dtype), mask=mask).double()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def lean_and_unfused(request, dtype, seed=0):
    """Outputs of the same weights through the lean model and through the unfused formulas
    (and the float64 run of the lean model, the accuracy reference)."""
    inputs = model_inputs(seed)
    lean = make_model(seed)
    state = {k: v.clone() for k, v in lean.state_dict().items()}
    want = run(make_model(seed), torch.float64, inputs)
    got_lean = run(lean, dtype, inputs)
    request.getfixturevalue("unfused")
    naive = make_model(seed)
    naive.load_state_dict(state)
    return got_lean, run(naive, dtype, inputs), want


def test_fp32_lean_step_equals_unfused_formulas_to_rounding(request):
    lean, naive, want = lean_and_unfused(request, torch.float32)
    assert rel(lean, naive) < 2e-6
    assert rel(lean, want) < 2e-6 and rel(naive, want) < 2e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_lean_step_no_less_accurate_than_unfused(request, seed):
    lean, naive, want = lean_and_unfused(request, torch.bfloat16, seed)
    err_lean, err_naive = rel(lean, want), rel(naive, want)
    assert err_naive > 1e-3  # bf16 rounding is visible, so the comparison means something
    assert err_lean <= 1.25 * err_naive, (err_lean, err_naive)


def test_fp32_bound_catches_a_wrong_modulation(monkeypatch):
    """The fp32 bound above can fail: a step that drops the modulation's '1 +' is far off."""
    inputs = model_inputs()
    want = run(make_model(), torch.float64, inputs)
    monkeypatch.setattr(stdit3, "modulate", lambda x, shift, scale: x * scale + shift)
    assert rel(run(make_model(), torch.float32, inputs), want) > 1e-2


# ----------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rotary_on_strided_queries_matches_float64(dtype, tol):
    rope = layers.RotaryEmbedding(16)
    qkv = torch.randn(6, 7, 3, 4, 16, dtype=torch.float64)  # [B', T, 3, heads, d]
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # a strided [B', heads, T, d] view, as in Attention
    got = rope.rotate_queries_or_keys(q.to(dtype)).double()
    want = ref.rotary(q)
    assert ((got - want).abs().max() / want.abs().max()).item() < tol


def test_rotary_tables_follow_freqs_dtype_and_length():
    rope = layers.RotaryEmbedding(8)
    x = torch.randn(2, 3, 5, 8)
    first = rope.rotate_queries_or_keys(x)
    with torch.no_grad():  # a checkpoint load writes the parameter in place
        rope.freqs.copy_(rope.freqs * 1.7)
    fresh = layers.RotaryEmbedding(8)
    with torch.no_grad():
        fresh.freqs.copy_(rope.freqs)
    again = rope.rotate_queries_or_keys(x)
    assert not torch.allclose(again, first)
    assert torch.equal(again, fresh.rotate_queries_or_keys(x))
    longer = torch.randn(2, 3, 9, 8)
    assert torch.equal(rope.rotate_queries_or_keys(longer), fresh.rotate_queries_or_keys(longer))
    assert rope.rotate_queries_or_keys(x.double()).dtype == torch.float64
    rope.double()  # .to() replaces the parameter's storage
    assert torch.equal(rope.rotate_queries_or_keys(x.double()),
                       fresh.double().rotate_queries_or_keys(x.double()))


def test_rotary_3d_tables_follow_a_device_scale_tensor():
    rope = layers.RotaryEmbedding(4)  # head dim 12 = 3 x 4
    x = torch.randn(2, 3, 2 * 3 * 4, 12, dtype=torch.float64)
    for s in (1.0, 1.5, 0.5):
        scale = torch.tensor(s, dtype=torch.float64)  # a new tensor per model call
        got = rope.rotate_3d(x, (2, 3, 4), scale)
        fresh = layers.RotaryEmbedding(4).rotate_3d(x, (2, 3, 4), s)
        assert torch.allclose(got, fresh, rtol=0, atol=1e-12), s


def test_rotary_seq_dim_other_than_tokens_is_refused():
    with pytest.raises(ValueError, match="seq_dim"):
        layers.RotaryEmbedding(8).rotate_queries_or_keys(torch.randn(5, 3, 8), seq_dim=0)


# ---------------------------------------------------------------------- memory and ops


def test_residual_stream_is_token_major():
    """A channel-major stream (the patch embedding's transposed conv output) made every block's
    LayerNorm and cross-attention copy their input."""
    m = make_model()
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
             for b in list(m.spatial_blocks) + list(m.temporal_blocks)]
    z, t, y, mask = model_inputs()
    with torch.no_grad():
        m(z, t, y, mask=mask)
    for h in hooks:
        h.remove()
    assert seen and all(seen)


def block_ops(temporal: bool, dtype=torch.float32):
    m = make_model().to(dtype)
    blk = (m.temporal_blocks if temporal else m.spatial_blocks)[0]
    B, T, S, C = 2, 4, 30, 64
    x = torch.randn(B, T * S, C, dtype=dtype)
    y = torch.randn(B, 6, C, dtype=dtype)
    t = torch.randn(B, 6 * C, dtype=dtype)
    return count_ops(lambda: blk(x, y, t, None, None, None, T, S), min_numel=B * T * S * C // 2)


# full-size element-wise passes of one block in eager mode (fp32, CPU):
#   modulate (norm1, norm2): 2 fused multiply-adds; gated residuals: 2; cross-attention residual:
#   1; qk-RMSNorm: 3 per q and per k (x^2, x * rsqrt, weight *); rotary (temporal): 2 per q
#   and k (x * cos, fused multiply-add); before the lean step: 15 (spatial) / 23 (temporal)
SPATIAL_ELEMENTWISE = 2 + 2 + 1 + 6
TEMPORAL_ELEMENTWISE = SPATIAL_ELEMENTWISE + 4
# copies: the temporal block's [B, T, S] -> [B, S, T] input, the rotary pair swap of q and k
TEMPORAL_COPIES = 1 + 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temporal", [False, True])
def test_block_elementwise_operator_budget(temporal, dtype):
    ops = block_ops(temporal, dtype)
    assert ops["matmul"]["calls"] == 6  # qkv, proj, q_linear, proj, fc1, fc2
    assert ops["norm"]["calls"] == 2 and ops["activation"]["calls"] == 1
    assert ops["elementwise"]["calls"] <= (TEMPORAL_ELEMENTWISE if temporal
                                           else SPATIAL_ELEMENTWISE)
    assert ops["copy"]["calls"] <= (TEMPORAL_COPIES if temporal else 0)
    assert ops["other"]["calls"] == 0


def test_operator_count_sees_an_unfused_block(unfused):
    """The budget test can fail: the unfused formulas exceed it (and copy in bf16)."""
    assert block_ops(True)["elementwise"]["calls"] > TEMPORAL_ELEMENTWISE
    assert block_ops(False)["elementwise"]["calls"] > SPATIAL_ELEMENTWISE
    assert block_ops(False, torch.bfloat16)["copy"]["calls"] > 0


def test_rms_norm_inference_path_matches_formula():
    norm = layers.LlamaRMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 7, 16).transpose(1, 2)  # strided, as q and k are
    with torch.no_grad():
        lean = norm(x)
        want = naive_rms(norm, x.double())
    assert lean.stride() == x.stride()  # no copy into another layout
    assert torch.allclose(lean.double(), want, rtol=1e-6, atol=1e-6)
    xb, nb = x.bfloat16(), layers.LlamaRMSNorm(16).bfloat16()
    with torch.no_grad():
        nb.weight.copy_(norm.weight)
        err_lean = (nb(xb).double() - want).abs().max()
        err_naive = (naive_rms(nb, xb).double() - want).abs().max()
    assert err_lean <= err_naive * 1.01


def test_rms_norm_forms_agree():
    """The fused kernel used on CUDA (F.rms_norm) computes the formula used elsewhere."""
    if not hasattr(F, "rms_norm"):
        pytest.skip("torch < 2.4 has no F.rms_norm")
    norm = layers.LlamaRMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16)
    assert torch.allclose(F.rms_norm(x, (16,), norm.weight, 1e-6), norm(x), atol=1e-6)


# ---------------------------------------------------------------------------- profile


def test_classify_operators():
    assert classify("aten::addmm") == "matmul" and classify("aten::linear") == "matmul"
    assert classify("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert classify("aten::native_layer_norm") == "norm"
    assert classify("aten::gelu") == "activation"
    assert classify("aten::addcmul") == "elementwise" and classify("aten::mul") == "elementwise"
    assert classify("aten::stack") == "copy" and classify("aten::clone") == "copy"
    assert classify("aten::view") == "" and classify("aten::transpose") == ""
    assert classify("aten::mean") == "other"


def test_profile_of_one_full_step():
    from opensora_duca.bench.benches import CPU_PRESET, build_random_bench

    bench = build_random_bench("cpu", CPU_PRESET, torch.device("cpu"), torch.float32, steps=3,
                               latent=(4, 3, 8, 8), hidden=64, depth=2, heads=4)
    calls = []
    bench.model.register_forward_hook(lambda *a: calls.append(1))
    call = first_model_call(bench)
    assert len(calls) == 0  # the sampler was stopped at its first call
    prof = profile_call(call, bench.device, repeat=1)
    shares = [v["share"] for v in prof["by_class"].values()]
    assert abs(sum(shares) - 1) < 1e-6
    # 4 blocks x 6 linear layers + embedders and final layer
    assert prof["by_class"]["matmul"]["calls"] >= 24
    assert prof["by_class"]["attention"]["calls"] == 8
    assert prof["by_class"]["matmul"]["ms"] > 0 and prof["step_s"] > 0
    assert 0 < prof["lean_share"] < 1
