"""Open-Sora 1.3 options of STDiT3 against the independent float64 reference
(tests/reference_v13.py): 3-D window attention, 3-D rotary embedding, i2v / v2v conditioning,
skip_temporal; and the STDiT3-XL/2 1.3 key table against upstream's names and shapes.

As in test_stdit3_reference.py, the model's float32 pieces (sinusoids, position grid, RMSNorm)
are swapped for float64 versions (fixture ``float64_pieces``) for the TIGHT comparisons; the
3-D rotary embedding computes in float64 for float64 inputs and is checked as it is.
"""
from __future__ import annotations

import pytest
import reference_v13 as ref13
import torch
from test_stdit3_reference import (  # noqa: F401 (fixture)
    float64_pieces,
    params,
    randomise,
    rel_err,
)

from opensora_duca.models.stdit3 import STDiT3
from opensora_duca.registry import MODELS

TIGHT = 1e-10
HEADS, HIDDEN, CY, L = 2, 24, 12, 6  # head dim 12: thirds of 4 (two rotated pairs each)


def make_model(depth=2, seed=0, **opts):
    torch.manual_seed(seed)
    m = STDiT3(in_channels=3, hidden_size=HIDDEN, depth=depth, num_heads=HEADS,
               caption_channels=CY, model_max_length=L, input_sq_size=64, **opts)
    return randomise(m, seed + 1).double().eval()  # cond embedders included


def inputs(b=2, t=3, h=6, w=10, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    z = torch.randn(b, 3, t, h, w, generator=g, dtype=torch.float64)
    y = torch.randn(b, 1, L, CY, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])[:b]
    timestep = torch.tensor([812.5, 37.0], dtype=torch.float64)[:b]
    return z, timestep, y, mask


def conditioning(z, mask_index, seed=1):
    g = torch.Generator().manual_seed(200 + seed)
    cond_mask = torch.zeros_like(z)
    cond_mask[:, :, mask_index] = 1.0
    cond = torch.randn(z.shape, generator=g, dtype=torch.float64) * cond_mask
    y_null = torch.randn(z.shape[0], 1, L, CY, generator=g, dtype=torch.float64)
    return dict(cond=cond, cond_mask=cond_mask, mask_index=mask_index, y_null=y_null)


# -------------------------------------------------------------- pieces
def test_rope3d_matches_equation():
    m = make_model(kernel_size=(2, 2, -1))
    assert m.rope.freqs.shape == (2,)  # rotation dim = head dim / 3 = 4
    want_f = 10000.0 ** (-2.0 * torch.arange(2, dtype=torch.float64) / 4)
    assert torch.allclose(m.rope.freqs.double(), want_f, rtol=1e-7)
    g = torch.Generator().manual_seed(3)
    n1, n2, n3, s = 3, 4, 2, 1.7
    x = torch.randn(2, HEADS, n1 * n2 * n3, 12, generator=g, dtype=torch.float64)
    pos = torch.tensor([[t, r / s, c / s] for r in range(n1) for c in range(n2)
                        for t in range(n3)], dtype=torch.float64)
    want = ref13.rope3d(x, pos, m.rope.freqs.double())
    assert rel_err(m.rope.rotate_3d(x, (n1, n2, n3), s), want) < TIGHT
    assert rel_err(m.rope.rotate_3d(x.float(), (n1, n2, n3), s).double(), want) < 1e-6
    # every third matters: a grid that swaps rows and columns gives other numbers
    assert rel_err(m.rope.rotate_3d(x, (n1, n2, n3), 1.0), want) > 1e-3


@pytest.mark.parametrize("kernel", [(2, 4, -1), (4, 3, 2), (-1, -1, -1)])
@pytest.mark.parametrize("with_x_mask", [False, True])
def test_window_block(float64_pieces, kernel, with_x_mask):  # noqa: F811
    m = make_model(kernel_size=kernel, use_spatial_rope=True)
    P = params(m)
    g = torch.Generator().manual_seed(5)
    B, T, H, W, C = 2, 3, 3, 5, HIDDEN
    S = H * W
    x = torch.randn(B, T * S, C, generator=g, dtype=torch.float64)
    y = torch.randn(B, L, C, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    t_mlp = torch.randn(B, 6 * C, generator=g, dtype=torch.float64) * 0.5
    t0_mlp = torch.randn(B, 6 * C, generator=g, dtype=torch.float64) * 0.5
    x_mask = torch.tensor([[True, False, True], [False, True, True]]) if with_x_mask else None
    scale = 1.3
    opts = dict(kernel_size=kernel, use_spatial_rope=True)
    for temporal in (False, True):
        blk = (m.temporal_blocks if temporal else m.spatial_blocks)[1]
        prefix = f"{'temporal' if temporal else 'spatial'}_blocks.1."
        with torch.no_grad():
            got = blk(x, y, t_mlp, mask.bool(), x_mask, t0_mlp if with_x_mask else None, T, S,
                      H, W, scale)
        want = ref13.block(P, prefix, x.view(B, T, S, C), y, mask, t_mlp, t0_mlp, x_mask,
                           temporal, HEADS, H, W, scale, opts).reshape(B, T * S, C)
        assert rel_err(got, want) < TIGHT, (temporal, rel_err(got, want))
    # the reference tells windows apart: one window over everything gives other numbers
    whole = ref13.block(P, "temporal_blocks.1.", x.view(B, T, S, C), y, mask, t_mlp, t0_mlp,
                        x_mask, True, HEADS, H, W, scale,
                        dict(kernel_size=(-1, -1, -1), use_spatial_rope=True))
    if kernel != (-1, -1, -1):
        assert rel_err(got, whole.reshape(B, T * S, C)) > 1e-3


CASES = {
    # name: (model options, forward extras)
    "t2v_window_spatial_rope": (dict(kernel_size=(2, 4, -1), use_spatial_rope=True), {}),
    "window_time_kernel_no_spatial_rope": (dict(kernel_size=(4, 3, 2)), {}),
    "x_mask": (dict(kernel_size=(2, 4, -1), use_spatial_rope=True), dict(x_mask=True)),
    "i2v_mask_index": (dict(kernel_size=(2, 4, -1), use_spatial_rope=True, cond_embedders=True),
                       dict(mask_index=[0])),
    "v2v_two_frames": (dict(kernel_size=(2, 4, -1), cond_embedders=True),
                       dict(mask_index=[0, 2])),
    "skip_temporal": (dict(kernel_size=(2, 4, -1), use_spatial_rope=True, skip_temporal=True),
                      {}),
    "no_window_12_temporal": (dict(cond_embedders=True), dict(mask_index=[1])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_whole_model(float64_pieces, case):  # noqa: F811
    opts, extra = CASES[case]
    m = make_model(**opts)
    P = params(m)
    z, timestep, y, mask = inputs()
    kw = dict(height=torch.tensor([96.0, 96.0]), width=torch.tensor([160.0, 160.0]),
              fps=torch.tensor([24.0, 12.0], dtype=torch.float64))
    if extra.get("x_mask"):
        kw["x_mask"] = torch.tensor([[False, True, True], [True, False, True]])
    if "mask_index" in extra:
        kw.update(conditioning(z, extra["mask_index"]))
    with torch.no_grad():
        got = m(z, timestep, y, mask=mask, **kw)
    ref_kw = dict(kw, height=96.0, width=160.0)
    want = ref13.forward(P, z, timestep, y, mask=mask, heads=HEADS, depth=2, input_sq_size=64,
                         **{k: v for k, v in opts.items() if k != "cond_embedders"}, **ref_kw)
    assert got.shape == z.shape[:1] + (6,) + z.shape[2:]
    assert rel_err(got.double(), want) < 1.2e-7  # float32 output
    if "mask_index" in extra:  # the conditioning and the null caption both matter
        for key in ("cond", "y_null"):
            other = dict(ref_kw, **{key: ref_kw[key] * 0.5})
            alt = ref13.forward(P, z, timestep, y, mask=mask, heads=HEADS, depth=2,
                                input_sq_size=64,
                                **{k: v for k, v in opts.items() if k != "cond_embedders"},
                                **other)
            assert rel_err(alt, want) > 1e-4, key


def test_whole_model_float32_close_to_reference():
    opts = dict(kernel_size=(2, 4, -1), use_spatial_rope=True, cond_embedders=True)
    m = make_model(**opts).float()
    P = params(m)
    z, timestep, y, mask = inputs()
    kw = conditioning(z, [0])
    with torch.no_grad():
        got = m(z.float(), timestep.float(), y.float(), mask=mask,
                **{k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()})
    want = ref13.forward(P, z, timestep, y, mask=mask, heads=HEADS, depth=2, input_sq_size=64,
                         kernel_size=(2, 4, -1), use_spatial_rope=True, **kw)
    assert rel_err(got.double(), want) < 1e-4


def test_12_model_unchanged_by_new_arguments():
    """A model without 1.3 options computes what it did: same keys as before, and the 1.3
    forward arguments are rejected with a clear message."""
    m = make_model()
    assert not any(k.startswith("x_embedder_cond") for k in m.state_dict())
    assert m.rope.freqs.shape == (HIDDEN // HEADS // 2,)
    z, timestep, y, mask = inputs()
    with pytest.raises(ValueError, match="cond_embedders=True"):
        m(z, timestep, y, mask=mask, **conditioning(z, [0]))


# -------------------------------------------------------------- validation
@pytest.mark.parametrize("opts, match", [
    (dict(kernel_size=(8, 8)), "kernel_size"),
    (dict(kernel_size=(8, 0, -1)), "kernel_size"),
    (dict(use_spatial_rope=True), "use_spatial_rope"),
    (dict(skip_temporal="no"), "skip_temporal"),
    (dict(cond_embedders=1), "cond_embedders"),
])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        STDiT3(in_channels=3, hidden_size=HIDDEN, depth=1, num_heads=HEADS, caption_channels=CY,
               model_max_length=L, **opts)


def test_head_dim_must_split_in_three_pairs():
    with pytest.raises(ValueError, match="divisible by 6"):
        STDiT3(in_channels=3, hidden_size=32, depth=1, num_heads=4, caption_channels=CY,
               model_max_length=L, kernel_size=(8, 8, -1))


@pytest.mark.parametrize("bad, match", [
    (dict(mask_index=[3]), "mask_index"),
    (dict(mask_index=[0, 0]), "mask_index"),
    (dict(mask_index=[0], cond=None), "cond="),
    (dict(mask_index=[0], y_null=None), "y_null"),
])
def test_bad_conditioning(bad, match):
    m = make_model(kernel_size=(2, 4, -1), cond_embedders=True)
    z, timestep, y, mask = inputs()
    kw = dict(conditioning(z, [0]), **bad)
    with pytest.raises(ValueError, match=match):
        m(z, timestep, y, mask=mask, **kw)


# -------------------------------------------------------------- key table
def upstream_v13_xl2_keys():
    """Open-Sora 1.3's STDiT3-XL/2 state dict (names and shapes, as upstream's modules
    register them; in_channels 16, kernel_size set: rotary dim 72 / 3 = 24)."""
    C, cin, p = 1152, 16, (1, 2, 2)
    keys = {"rope.freqs": (12,), "x_embedder.proj.weight": (C, cin) + p,
            "x_embedder.proj.bias": (C,), "x_embedder_cond.proj.weight": (C, cin) + p,
            "x_embedder_cond.proj.bias": (C,), "x_embedder_cond_mask.proj.weight": (C, cin) + p,
            "x_embedder_cond_mask.proj.bias": (C,),
            "t_embedder.mlp.0.weight": (C, 256), "t_embedder.mlp.0.bias": (C,),
            "t_embedder.mlp.2.weight": (C, C), "t_embedder.mlp.2.bias": (C,),
            "fps_embedder.mlp.0.weight": (C, 256), "fps_embedder.mlp.0.bias": (C,),
            "fps_embedder.mlp.2.weight": (C, C), "fps_embedder.mlp.2.bias": (C,),
            "t_block.1.weight": (6 * C, C), "t_block.1.bias": (6 * C,),
            "y_embedder.y_embedding": (300, 4096),
            "y_embedder.y_proj.fc1.weight": (C, 4096), "y_embedder.y_proj.fc1.bias": (C,),
            "y_embedder.y_proj.fc2.weight": (C, C), "y_embedder.y_proj.fc2.bias": (C,),
            "final_layer.scale_shift_table": (2, C),
            "final_layer.linear.weight": (4 * 32, C), "final_layer.linear.bias": (4 * 32,)}
    block = {"scale_shift_table": (6, C), "attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,),
             "attn.q_norm.weight": (72,), "attn.k_norm.weight": (72,),
             "attn.proj.weight": (C, C), "attn.proj.bias": (C,),
             "cross_attn.q_linear.weight": (C, C), "cross_attn.q_linear.bias": (C,),
             "cross_attn.kv_linear.weight": (2 * C, C), "cross_attn.kv_linear.bias": (2 * C,),
             "cross_attn.proj.weight": (C, C), "cross_attn.proj.bias": (C,),
             "mlp.fc1.weight": (4 * C, C), "mlp.fc1.bias": (4 * C,),
             "mlp.fc2.weight": (C, 4 * C), "mlp.fc2.bias": (C,)}
    for kind in ("spatial", "temporal"):
        for i in range(28):
            keys.update({f"{kind}_blocks.{i}.{k}": v for k, v in block.items()})
    return keys


def test_xl2_v13_key_table():
    with torch.device("meta"):
        m = MODELS.build(dict(type="STDiT3-XL/2", in_channels=16, cond_embedders=True,
                              kernel_size=(8, 8, -1), use_spatial_rope=True))
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    want = upstream_v13_xl2_keys()
    assert sorted(set(got) ^ set(want)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    assert len(got) == 25 + 2 * 28 * 17


# -------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("kernel", [(2, 4, -1), (2, 2, 2), (-1, -1, -1)])
def test_window_attention_flops_equal_counted_matmuls(kernel):
    """models.window.window_attention_flops against torch's FLOP counter on one window
    attention call (math backend: every product is a counted matmul)."""
    from torch.utils.flop_counter import FlopCounterMode

    from opensora_duca.models.window import window_attention_flops
    m = make_model(kernel_size=kernel, attn_backend="math").float()
    B, T, H, W, C = 2, 3, 3, 5, HIDDEN
    x = torch.randn(B * H * W, T, C)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m.temporal_blocks[0].attn(x, H=H, W=W, scale=1.0)
    assert window_attention_flops(B, T, H, W, C, kernel) == counter.get_total_flops()
    if kernel == (-1, -1, -1):  # one window: full attention over all T*H*W tokens
        n = T * H * W
        assert window_attention_flops(B, T, H, W, C, kernel) == B * (8 * n * C * C + 4 * n * n * C)


# ------------------------------------------------ a local Hugging Face folder (force_huggingface)
def _hf_folder(tmp_path, config, model):
    import json

    from safetensors.torch import save_file

    folder = tmp_path / "OpenSora-STDiT-v4"
    folder.mkdir()
    save_file({k: v.float().contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_hf_folder_config_builds_the_model(tmp_path):
    """As upstream's STDiT3.from_pretrained: config.json's options replace the preset's
    (STDiT3-XL/2's depth 28 / hidden 1152 here), the run config's own keys win, and the 1.3
    reference-frame embedders are built because the weights hold them."""
    src = make_model(depth=1, kernel_size=(2, 3, -1), use_spatial_rope=True,
                     cond_embedders=True).float()
    config = dict(architectures=["STDiT3"], model_type="STDiT3", torch_dtype="float32",
                  transformers_version="4.39.3", in_channels=3, hidden_size=HIDDEN, depth=1,
                  num_heads=HEADS, caption_channels=CY, model_max_length=L, input_sq_size=64,
                  patch_size=[1, 2, 2], kernel_size=[2, 3, -1], use_spatial_rope=True,
                  input_size=[None, None, None], qk_norm=True)
    folder = _hf_folder(tmp_path, config, src)
    built = MODELS.build(dict(type="STDiT3-XL/2", from_pretrained=str(folder),
                              force_huggingface=True, class_dropout_prob=0.0))
    assert built.kernel_size == (2, 3, -1) and len(built.spatial_blocks) == 1
    assert hasattr(built, "x_embedder_cond")
    z, timestep, y, mask = (t.float() if t.is_floating_point() else t for t in inputs())
    with torch.no_grad():
        assert torch.equal(built(z, timestep, y, mask=mask), src(z, timestep, y, mask=mask))
    # without force_huggingface the folder is only a checkpoint: the preset's shapes refuse it
    with pytest.raises(RuntimeError, match="does not match"):
        MODELS.build(dict(type="STDiT3-S/2", from_pretrained=str(folder)))


def test_hf_folder_bad_config_is_one_line(tmp_path):
    folder = _hf_folder(tmp_path, {}, make_model(depth=1).float())
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not readable JSON") as err:
        MODELS.build(dict(type="STDiT3-XL/2", from_pretrained=str(folder),
                          force_huggingface=True))
    assert "\n" not in str(err.value)
