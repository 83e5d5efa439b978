"""opensora_duca's Open-Sora 2.0 MMDiT against the upstream-shaped double (tests/upstream_mmdit.py)
and the float64 token-by-token reference (tests/reference_mmdit.py)."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import upstream_mmdit as up
from reference_mmdit import reference_forward

from opensora_duca.models import mmdit
from opensora_duca.registry import MODELS, build_module

# upstream's configs/diffusion/inference/256px.py model dict (768px.py has the same values)
UPSTREAM_256PX = dict(guidance_embed=False, fused_qkv=False, use_liger_rope=True, in_channels=64,
                      vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                      num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                      theta=10_000, qkv_bias=True, cond_embed=True)


def ours_from_double(double: up.MMDiTModel, dtype=torch.float32) -> mmdit.MMDiTModel:
    cfg = {k: getattr(double.config, k) for k in mmdit._CONFIG_FIELDS}
    model = mmdit.MMDiTModel(mmdit.MMDiTConfig(**cfg))
    model.load_state_dict(double.state_dict(), strict=True)
    return model.to(dtype).eval()


def table(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def close(a, b, tol):
    diff = (a.double() - b.double()).abs().max().item()
    assert diff <= tol * max(1.0, b.double().abs().max().item()), f"max diff {diff}"


# ------------------------------------------------------------------ parameter names
@pytest.mark.parametrize("fused_qkv", [True, False])
def test_state_dict_table_matches_double_small(fused_qkv):
    for extra in (dict(cond_embed=True, guidance_embed=False),
                  dict(cond_embed=False, guidance_embed=True)):
        double = up.MMDiTModel(up.small_config(fused_qkv=fused_qkv, **extra))
        ours = ours_from_double(double)
        assert table(ours) == table(double)


@pytest.mark.parametrize("fused_qkv", [True, False])
def test_state_dict_table_matches_double_full_size_on_meta(fused_qkv):
    cfg = dict(UPSTREAM_256PX, fused_qkv=fused_qkv)
    with torch.device("meta"):
        double = up.MMDiTModel(up.MMDiTConfig(from_pretrained=None, cache_dir=None, **cfg))
        ours = mmdit.MMDiTModel(mmdit.MMDiTConfig(**cfg))
    assert table(ours) == table(double)
    assert all(p.device.type == "meta" for p in ours.parameters())


def test_published_preset_is_upstream_config():
    model = build_module(dict(type="OpenSora-v2-MMDiT", device_map="meta"), MODELS)
    for key, value in UPSTREAM_256PX.items():
        assert getattr(model.config, key) == value, key
    assert model.img_in.weight.dtype == torch.bfloat16  # upstream's default torch_dtype
    with torch.device("meta"):
        double = up.MMDiTModel(up.MMDiTConfig(from_pretrained=None, cache_dir=None,
                                              **UPSTREAM_256PX))
    assert table(model) == table(double)


def test_cpu_preset_runs():
    model = build_module(dict(type="MMDiT-cpu"), MODELS)
    assert model.config.hidden_size == 64 and model.config.cond_embed
    inputs = up.make_inputs(model.config)
    with torch.no_grad():
        out = model(**inputs)
    assert out.shape == inputs["img"].shape and torch.isfinite(out).all()


# ------------------------------------------------------------------ outputs
CASES = {
    "fused_interleaved_cond": dict(fused_qkv=True, use_liger_rope=False, cond_embed=True),
    "split_liger_cond (published)": dict(fused_qkv=False, use_liger_rope=True, cond_embed=True),
    "fused_liger_guidance": dict(fused_qkv=True, use_liger_rope=True, cond_embed=False,
                                 guidance_embed=True),
    "split_interleaved_guidance": dict(fused_qkv=False, use_liger_rope=False, cond_embed=False,
                                       guidance_embed=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_double_fp32(case):
    double = up.build_double(seed=3, **CASES[case])
    ours = ours_from_double(double)
    inputs = up.make_inputs(double.config, grid=(2, 3, 4), txt_len=5, seed=1)
    with torch.no_grad():
        want = double(**inputs)
        got = ours(**inputs)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert want.abs().max() > 0.1  # not a degenerate output
    close(got, want, 2e-5)


@pytest.mark.parametrize("case", ["fused_interleaved_cond", "split_liger_cond (published)",
                                  "fused_liger_guidance"])
def test_matches_float64_reference(case):
    double = up.build_double(seed=5, **CASES[case])
    ours = ours_from_double(double, torch.float64)
    inputs = up.make_inputs(double.config, grid=(2, 2, 3), txt_len=3, seed=2,
                            dtype=torch.float64)
    inputs["img_ids"][..., 1:] *= 3  # larger angles: a wrong frequency or pairing shows
    with torch.no_grad():
        got = ours(**inputs)
        want = reference_forward(double.state_dict(), double.config, **inputs)
        dbl = double.float()(**{k: v.float() for k, v in inputs.items()})
    assert got.dtype == torch.float64
    close(got, want, 1e-11)
    # the double (upstream numerics: float32 tables and statistics) is the same function
    close(dbl, want, 2e-4)


def test_bf16_runs_close_to_fp32():
    double = up.build_double(seed=7, **CASES["split_liger_cond (published)"])
    ours32 = ours_from_double(double)
    ours16 = ours_from_double(double, torch.bfloat16)
    inputs = up.make_inputs(double.config, seed=4)
    with torch.no_grad():
        a = ours32(**inputs)
        # timesteps stay fp32: t * 1000 in bf16 moves t by up to ~1 (upstream does that)
        b = ours16(**{k: v if k == "timesteps" else v.to(torch.bfloat16)
                      for k, v in inputs.items()})
    assert b.dtype == torch.bfloat16
    close(b, a, 0.05)


def test_grad_checkpointing_gives_the_same_gradients():
    double = up.build_double(seed=8, **CASES["fused_liger_guidance"])
    plain = ours_from_double(double).train()
    cfg = {k: getattr(double.config, k) for k in mmdit._CONFIG_FIELDS}
    ckpt = mmdit.MMDiTModel(mmdit.MMDiTConfig(**dict(cfg, grad_ckpt_settings=(1, 2))))
    ckpt.load_state_dict(double.state_dict())
    ckpt.train()
    calls = []
    ckpt.double_blocks[0].img_mod.register_forward_hook(lambda *a: calls.append(0))
    inputs = up.make_inputs(double.config, seed=9)
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        (model(**inputs) ** 2).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert len(calls) == 2  # checkpointed: recomputed in the backward pass (up to what it needs)
    for k, g in grads[0].items():
        close(grads[1][k], g, 1e-5)


# ------------------------------------------------------------------ structure for the cache
def test_forward_signature_and_block_processors():
    ours = ours_from_double(up.build_double())
    params = list(inspect.signature(ours.forward).parameters)
    assert params == ["img", "img_ids", "txt", "txt_ids", "timesteps", "y_vec", "cond",
                      "guidance", "kwargs"]
    dbl, sgl = ours.double_blocks[0], ours.single_blocks[0]
    assert isinstance(dbl.get_processor(), mmdit.DoubleStreamBlockProcessor)
    assert isinstance(sgl.get_processor(), mmdit.SingleStreamBlockProcessor)
    for block in (dbl, sgl):
        assert block.num_heads == 4 and block.head_dim == 8 and block.hidden_size == 32
        assert block.fused_qkv is False
    assert sgl.mlp_hidden_dim == 64 and isinstance(sgl.mlp_act, torch.nn.GELU)

    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args):
            calls.append(type(args[0]).__name__)
            return self.inner(*args)

    for block in (dbl, sgl):
        block.set_processor(Counting(block.get_processor()))
    hooked = []
    for name in ("double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.proj",
                 "double_blocks.0.img_mlp", "double_blocks.0.txt_mlp",
                 "single_blocks.0.q_proj", "single_blocks.0.k_proj", "single_blocks.0.v_mlp",
                 "single_blocks.0.linear2"):
        ours.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name: hooked.append(name))
    with torch.no_grad():
        ours(**up.make_inputs(ours.config))
    assert calls == ["DoubleStreamBlock", "SingleStreamBlock"]
    assert len(hooked) == 8 and len(set(hooked)) == 8


# ------------------------------------------------------------------ checkpoints
def _save(sd, path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def test_safetensors_from_double_reproduces_double(tmp_path):
    double = up.build_double(seed=11, **CASES["split_liger_cond (published)"])
    path = tmp_path / "Open_Sora_v2_small.safetensors"
    _save(double.state_dict(), path)
    cfg = {k: getattr(double.config, k) for k in mmdit._CONFIG_FIELDS
           if k not in ("from_pretrained", "cache_dir")}
    ours = build_module(dict(type="flux", from_pretrained=str(path), device_map="cpu",
                             torch_dtype=torch.float32, strict_load=True, **cfg), MODELS)
    inputs = up.make_inputs(double.config, seed=6)
    with torch.no_grad():
        close(ours(**inputs), double(**inputs), 2e-5)
    # a folder holding model.safetensors loads the same
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(path.read_bytes())
    again = build_module(dict(type="flux", from_pretrained=str(folder), device_map="cpu",
                              torch_dtype="fp32", **cfg), MODELS)
    for k, v in again.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    double = up.build_double(seed=12)
    sd = dict(double.state_dict())
    del sd["double_blocks.1.txt_attn.proj.weight"]
    sd["extra_head.weight"] = torch.zeros(2)
    path = tmp_path / "bad.safetensors"
    _save(sd, path)
    cfg = {k: getattr(double.config, k) for k in mmdit._CONFIG_FIELDS
           if k not in ("from_pretrained", "cache_dir")}
    with pytest.raises(RuntimeError) as err:
        build_module(dict(type="flux", from_pretrained=str(path), device_map="cpu",
                          torch_dtype=torch.float32, strict_load=True, **cfg), MODELS)
    assert "double_blocks.1.txt_attn.proj.weight" in str(err.value)
    assert "extra_head.weight" in str(err.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_module(dict(type="flux", from_pretrained=str(path), device_map="cpu",
                                  torch_dtype=torch.float32, **cfg), MODELS)
    msgs = " ".join(str(w.message) for w in caught)
    assert "missing keys" in msgs and "double_blocks.1.txt_attn.proj.weight" in msgs
    assert "unexpected keys" in msgs and "extra_head.weight" in msgs
    assert torch.equal(model.img_in.weight, double.img_in.weight)
    # a shape mismatch is always an error
    sd2 = dict(double.state_dict())
    sd2["img_in.weight"] = torch.zeros(3, 3)
    _save(sd2, tmp_path / "shape.safetensors")
    with pytest.raises(RuntimeError, match="img_in.weight"):
        build_module(dict(type="flux", from_pretrained=str(tmp_path / "shape.safetensors"),
                          device_map="cpu", torch_dtype=torch.float32, **cfg), MODELS)


# ------------------------------------------------------------------ bad configuration
BAD = [
    (dict(num_heads=5), "num_heads=5"),
    (dict(axes_dim=[2, 2, 2]), "axes_dim=[2, 2, 2]"),
    (dict(axes_dim=[3, 1, 4]), "axes_dim=[3, 1, 4]"),
    (dict(fused_qkv="yes"), "fused_qkv='yes'"),
    (dict(use_liger_rope=1), "use_liger_rope=1"),
    (dict(depth=-1), "depth=-1"),
    (dict(hidden_size=0), "hidden_size=0"),
    (dict(mlp_ratio=0.0), "mlp_ratio=0.0"),
    (dict(theta=0), "theta=0"),
    (dict(grad_ckpt_settings=(1,)), "grad_ckpt_settings=(1,)"),
]


@pytest.mark.parametrize("change,needle", BAD, ids=[n for _, n in BAD])
def test_bad_config_is_a_one_line_error(change, needle):
    cfg = {k: getattr(up.small_config(), k) for k in mmdit._CONFIG_FIELDS
           if k not in ("from_pretrained", "cache_dir")}
    cfg.update(change)
    with pytest.raises(ValueError) as err:
        mmdit.MMDiTConfig(**cfg)
    msg = str(err.value)
    assert needle in msg and "accepted" in msg and "\n" not in msg


def test_bad_builder_options_are_one_line_errors():
    for cfg, needle in ((dict(type="MMDiT-cpu", torch_dtype="int8"), "torch_dtype='int8'"),
                        (dict(type="MMDiT-cpu", hiden_size=3), "hiden_size"),
                        (dict(type="MMDiT-cpu", attn_backend="fast"), "'fast'"),
                        (dict(type="MMDiT-cpu", strict_load="no"), "strict_load='no'"),
                        (dict(type="MMDiT-cpu", enable_sequence_parallelism=1),
                         "enable_sequence_parallelism=1")):
        with pytest.raises(ValueError) as err:
            build_module(cfg, MODELS)
        assert needle in str(err.value) and "accepted" in str(err.value)
        assert "\n" not in str(err.value)


def test_ids_of_batch_one_are_shared():
    double = up.build_double(seed=13, **CASES["fused_interleaved_cond"])
    ours = ours_from_double(double)
    inputs = up.make_inputs(double.config, seed=5)
    shared = dict(inputs, img_ids=inputs["img_ids"][:1], txt_ids=inputs["txt_ids"][:1])
    with torch.no_grad():
        close(ours(**shared), double(**inputs), 2e-5)


def test_bad_inputs_name_the_argument():
    model = ours_from_double(up.build_double())
    inputs = up.make_inputs(model.config)
    for key, bad, needle in (("cond", None, "cond=None"),
                             ("img", inputs["img"][..., :5], "img: expected"),
                             ("txt_ids", inputs["txt_ids"][:, :2], "txt_ids: expected")):
        with pytest.raises(ValueError, match=needle):
            model(**dict(inputs, **{key: bad}))
