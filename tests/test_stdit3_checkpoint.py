"""STDiT3 checkpoints: the XL/2 state-dict table (names as in docs/stdit3.md), and loading from
.safetensors, .pt and an HF-style folder with clear errors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from opensora_duca.models.checkpoint import load_checkpoint
from opensora_duca.registry import MODELS, build_module


def xl2_table(depth=28, c=1152, heads=16, cy=4096, L=300, cin=4):
    d = c // heads
    t = {
        "rope.freqs": (d // 2,),
        "x_embedder.proj.weight": (c, cin, 1, 2, 2), "x_embedder.proj.bias": (c,),
        "t_embedder.mlp.0.weight": (c, 256), "t_embedder.mlp.0.bias": (c,),
        "t_embedder.mlp.2.weight": (c, c), "t_embedder.mlp.2.bias": (c,),
        "fps_embedder.mlp.0.weight": (c, 256), "fps_embedder.mlp.0.bias": (c,),
        "fps_embedder.mlp.2.weight": (c, c), "fps_embedder.mlp.2.bias": (c,),
        "t_block.1.weight": (6 * c, c), "t_block.1.bias": (6 * c,),
        "y_embedder.y_embedding": (L, cy),
        "y_embedder.y_proj.fc1.weight": (c, cy), "y_embedder.y_proj.fc1.bias": (c,),
        "y_embedder.y_proj.fc2.weight": (c, c), "y_embedder.y_proj.fc2.bias": (c,),
        "final_layer.scale_shift_table": (2, c),
        "final_layer.linear.weight": (4 * 2 * cin, c), "final_layer.linear.bias": (4 * 2 * cin,),
    }
    for kind in ("spatial", "temporal"):
        for i in range(depth):
            p = f"{kind}_blocks.{i}."
            t.update({
                p + "scale_shift_table": (6, c),
                p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,),
                p + "attn.q_norm.weight": (d,), p + "attn.k_norm.weight": (d,),
                p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                p + "cross_attn.q_linear.weight": (c, c), p + "cross_attn.q_linear.bias": (c,),
                p + "cross_attn.kv_linear.weight": (2 * c, c),
                p + "cross_attn.kv_linear.bias": (2 * c,),
                p + "cross_attn.proj.weight": (c, c), p + "cross_attn.proj.bias": (c,),
                p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,),
            })
    return t


def test_xl2_state_dict_matches_reference_table():
    with torch.device("meta"):
        model = build_module(dict(type="STDiT3-XL/2"), MODELS)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = xl2_table()
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not bad
    n_params = sum(p.numel() for p in model.parameters())
    assert 1.0e9 < n_params < 1.3e9  # "~1.1 B"


def test_3b_sizes():
    with torch.device("meta"):
        model = build_module(dict(type="STDiT3-3B/2"), MODELS)
    sd = model.state_dict()
    assert tuple(sd["spatial_blocks.27.attn.qkv.weight"].shape) == (3 * 1872, 1872)
    assert tuple(sd["temporal_blocks.0.attn.q_norm.weight"].shape) == (72,)
    assert tuple(sd["rope.freqs"].shape) == (36,)


def small(seed):
    torch.manual_seed(seed)
    return build_module(dict(type="STDiT3-S/2", depth=1, hidden_size=32, num_heads=2), MODELS)


def _randomised(seed=0):
    model = small(seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in model.state_dict().values():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt_wrapped", "folder"])
def test_round_trip(tmp_path, fmt):
    src = _randomised()
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(sd, str(path))
    elif fmt == "pt":
        path = tmp_path / "model.pt"
        torch.save(sd, path)
    elif fmt == "pt_wrapped":  # as saved from a DDP-wrapped training run
        path = tmp_path / "ckpt.pth"
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    else:
        path = tmp_path / "hf"
        path.mkdir()
        save_file(sd, str(path / "model.safetensors"))
        (path / "config.json").write_text("{}")
    loaded = build_module(dict(type="STDiT3-S/2", depth=1, hidden_size=32, num_heads=2,
                               from_pretrained=str(path)), MODELS)
    _assert_same(src, loaded)
    # also into an existing model
    other = small(5)
    load_checkpoint(other, str(path))
    _assert_same(src, other)


def test_missing_and_unexpected_keys_listed(tmp_path):
    sd = dict(_randomised().state_dict())
    del sd["final_layer.linear.bias"]
    sd["spatial_blocks.9.attn.extra"] = torch.zeros(1)
    sd["t_block.1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(RuntimeError) as err:
        load_checkpoint(small(1), str(path))
    msg = str(err.value)
    assert "bad.safetensors" in msg
    assert "missing keys: final_layer.linear.bias" in msg
    assert "unexpected keys: spatial_blocks.9.attn.extra" in msg
    assert "t_block.1.weight (3, 3) vs model (192, 32)" in msg


def test_hub_id_says_download_first():
    with pytest.raises(FileNotFoundError, match=r"looks like a hub id.*download it first"):
        build_module(dict(type="STDiT3-S/2", depth=1,
                          from_pretrained="hpcai-tech/OpenSora-STDiT-v3"), MODELS)


@pytest.mark.parametrize("recorded", [None, False, True])
def test_recorded_parameter_free_option_must_match(tmp_path, recorded):
    """temporal_pos_embed adds no weights, so only the export metadata can tell: a bundle
    recorded without it (or from before it was recorded) must not load into a model with it."""
    import json
    src = _randomised()
    model_cfg = dict(type="STDiT3-S/2")
    if recorded is not None:
        model_cfg["temporal_pos_embed"] = recorded
    path = tmp_path / "bundle.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(path),
              metadata=dict(config=json.dumps(dict(model=model_cfg))))
    want = bool(recorded)
    for built in (False, True):
        torch.manual_seed(0)
        m = build_module(dict(type="STDiT3-S/2", depth=1, hidden_size=32, num_heads=2,
                              temporal_pos_embed=built), MODELS)
        if built == want:
            load_checkpoint(m, str(path))
            assert torch.equal(m.t_block[1].weight, src.t_block[1].weight)
        else:
            with pytest.raises(ValueError, match=rf"temporal_pos_embed={want}.*built with "
                                                 rf"temporal_pos_embed={built}"):
                load_checkpoint(m, str(path))
    # a file without our metadata (e.g. an upstream checkpoint) is not checked
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(plain))
    load_checkpoint(build_module(dict(type="STDiT3-S/2", depth=1, hidden_size=32, num_heads=2,
                                      temporal_pos_embed=True), MODELS), str(plain))
