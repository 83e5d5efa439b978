"""STDiT3 against the independent float64 reference in tests/reference_impl.py.

The reference reads only the model's parameters. The model is run in float64, but it
evaluates four small pieces in float32 as upstream does: the timestep / fps sinusoid, the
position-embedding grid, the rotary embedding and RMSNorm ("fp32 inside"). So:

- each of those pieces is checked on its own against its equation at float32 accuracy;
- the blocks and the whole model are checked at TIGHT (1e-10 relative) with those four pieces
  swapped for float64 versions of the same equations (fixture ``float64_pieces``), which
  checks everything else -- layouts, modulation, x_mask, caption masks, padding, unpatchify --
  to float64 accuracy;
- and once more unpatched, at LOOSE (1e-4 relative; t = 812 in a float32 sinusoid alone is off
  by ~5e-5).
"""
from __future__ import annotations

import pytest
import reference_impl as ref
import torch

from opensora_duca.models.stdit3 import STDiT3

TIGHT = 1e-10
LOOSE = 1e-4


@pytest.fixture
def float64_pieces(monkeypatch):
    """Swap the model's four float32 pieces for float64 versions of the same equations (must be
    set up before the model is built: blocks keep a bound reference to the rotary method)."""
    from opensora_duca.models import layers

    def tstep(t, dim=256, max_period=10000):
        return ref.sinusoid(t, dim, max_period)

    def pos(self, h, w, scale, base_size, dtype, device):
        return ref.pos_embed_2d(h, w, self.inv_freq.shape[0] * 4, scale, base_size)[None].to(
            dtype)

    monkeypatch.setattr(layers, "timestep_embedding", tstep)
    monkeypatch.setattr(layers.PositionEmbedding2D, "forward", pos)
    monkeypatch.setattr(layers.RotaryEmbedding, "rotate_queries_or_keys",
                        lambda self, x, seq_dim=-2: ref.rotary(x))
    monkeypatch.setattr(layers.FramePositionEmbedding, "forward",
                        lambda self, t, dtype, device: ref.frame_pos_embed(t, self.dim).to(dtype))
    monkeypatch.setattr(layers.LlamaRMSNorm, "forward",
                        lambda self, x: ref.rms_norm(x, self.weight, self.variance_epsilon))


def make_model(qk_norm=True, hidden=32, heads=4, depth=2, cy=12, L=6, backend="sdpa", seed=0,
               temporal_pos_embed=False):
    torch.manual_seed(seed)
    m = STDiT3(in_channels=3, hidden_size=hidden, depth=depth, num_heads=heads,
               caption_channels=cy, model_max_length=L, qk_norm=qk_norm, input_sq_size=64,
               attn_backend=backend, temporal_pos_embed=temporal_pos_embed)
    return randomise(m, seed + 1).double().eval()


def randomise(m, seed):
    """Every parameter but ``rope.freqs`` non-zero and O(0.1-1), drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "rope.freqs":
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.5))
    return m


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def inputs(b=2, t=3, h=5, w=7, cy=12, L=6, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    z = torch.randn(b, 3, t, h, w, generator=g, dtype=torch.float64)
    y = torch.randn(b, 1, L, cy, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])[:b]
    timestep = torch.tensor([812.5, 37.0], dtype=torch.float64)[:b]
    return z, timestep, y, mask


def test_rope_freqs_parameter_matches_equation():
    m = make_model()
    assert torch.allclose(m.rope.freqs.double(), ref.rope_freqs(8), rtol=1e-7)


def test_float32_pieces_match_equations():
    from opensora_duca.models import layers
    t = torch.tensor([0.0, 1.0, 37.0, 812.5, 1000.0], dtype=torch.float64)
    assert (layers.timestep_embedding(t, 256).double() - ref.sinusoid(t)).abs().max() < 1e-4
    m = make_model()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64)  # [.., T=5, d=8]
    assert (m.rope.rotate_queries_or_keys(x) - ref.rotary(x)).abs().max() < 1e-5
    norm = m.spatial_blocks[0].attn.q_norm
    assert (norm(x) - ref.rms_norm(x, norm.weight)).abs().max() < 1e-5


def test_pos_embed_matches_equation():
    # column (w) coordinate in the first C/2 channels, resolution scale and base size applied
    m = make_model()
    h, w, scale = 3, 4, (96 * 160) ** 0.5 / 64
    got = m.pos_embed(h, w, scale, round((h * w) ** 0.5), torch.float64, "cpu")[0]
    want = ref.pos_embed_2d(h, w, 32, scale, round((h * w) ** 0.5))
    assert (got - want).abs().max() < 1e-6
    # the row coordinate must not be in the first half: row 0 and row 1 agree there
    assert torch.allclose(got[0, :16], got[w, :16])


@pytest.mark.parametrize("temporal", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("with_x_mask", [False, True])
def test_one_block(float64_pieces, temporal, qk_norm, with_x_mask):
    m = make_model(qk_norm=qk_norm)
    P = params(m)
    blocks = m.temporal_blocks if temporal else m.spatial_blocks
    prefix = f"{'temporal' if temporal else 'spatial'}_blocks.1."
    g = torch.Generator().manual_seed(5)
    B, T, S, C = 2, 3, 6, 32
    x = torch.randn(B, T * S, C, generator=g, dtype=torch.float64)
    y = torch.randn(B, 6, C, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    t_mlp = torch.randn(B, 6 * C, generator=g, dtype=torch.float64) * 0.5
    t0_mlp = torch.randn(B, 6 * C, generator=g, dtype=torch.float64) * 0.5
    x_mask = torch.tensor([[True, False, True], [False, True, True]]) if with_x_mask else None
    with torch.no_grad():
        got = blocks[1](x, y, t_mlp, mask.bool(), x_mask, t0_mlp if with_x_mask else None, T, S)
    want = ref.block_reference(P, prefix, x, y, mask, t_mlp, t0_mlp, x_mask, T, S, temporal, 4)
    err = rel_err(got, want)
    assert err < TIGHT, f"relative error {err}"
    if with_x_mask:  # the t0 modulation must matter
        plain = ref.block_reference(P, prefix, x, y, mask, t_mlp, t0_mlp, None, T, S,
                                    temporal, 4)
        assert rel_err(plain, want) > 1e-3


def test_final_layer_x_mask_is_upstream_form():
    """Frames where x_mask is False take LN(u) * (1 + scale0) + shift0 with u the already
    modulated tokens (Open-Sora 1.2.0); normalising the block output once for both versions
    gives different numbers there, and this test tells the two apart."""
    m = make_model(depth=1)
    P = params(m)
    g = torch.Generator().manual_seed(7)
    B, T, S, C = 2, 3, 4, 32
    x = torch.randn(B, T, S, C, generator=g, dtype=torch.float64) * 2 + 0.5
    t_emb = torch.randn(B, C, generator=g, dtype=torch.float64)
    t0_emb = torch.randn(B, C, generator=g, dtype=torch.float64)
    x_mask = torch.tensor([[True, False, True], [False, False, True]])
    with torch.no_grad():
        got = m.final_layer(x.reshape(B, T * S, C), t_emb, x_mask, t0_emb, T, S)
    want = ref.final_layer(P, x, t_emb, t0_emb, x_mask).reshape(B, T * S, -1)
    assert rel_err(got, want) < TIGHT
    # the single-normalisation form: LN(x) with the t0 shift/scale on masked-off frames
    tab = P["final_layer.scale_shift_table"]
    once = ref.layer_norm(x) * (1 + (tab[1] + t0_emb)[:, None, None]) + \
        (tab[0] + t0_emb)[:, None, None]
    once = ref.linear(P, "final_layer.linear", once).reshape(B, T * S, -1)
    off = ~x_mask.repeat_interleave(S, dim=1)  # tokens of masked-off frames
    assert rel_err(got[off], once[off]) > 0.1
    # frames where x_mask is True are the plain modulation
    plain = ref.final_layer(P, x, t_emb).reshape(B, T * S, -1)
    assert rel_err(got[~off], plain[~off]) < TIGHT and rel_err(got[off], plain[off]) > 0.1


CASES = {
    # name: (z spatial size h, w; x_mask; caption mask given per sample; fps; size conditioning)
    "odd_hw_padding": dict(h=5, w=7, x_mask=False, fps=(24.0, 12.0), size=(96.0, 160.0)),
    "x_mask": dict(h=4, w=6, x_mask=True, fps=(24.0, 24.0), size=(64.0, 64.0)),
    "no_size_default_fps": dict(h=4, w=5, x_mask=False, fps=None, size=None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_whole_model(float64_pieces, case):
    check_whole_model(case, TIGHT)


def test_whole_model_unpatched():
    check_whole_model("x_mask", LOOSE)


def check_whole_model(case, tol):
    c = CASES[case]
    m = make_model()
    P = params(m)
    z, timestep, y, mask = inputs(h=c["h"], w=c["w"])
    x_mask = torch.tensor([[False, True, True], [True, False, True]]) if c["x_mask"] else None
    kw = {}
    if c["fps"] is not None:
        kw["fps"] = torch.tensor(c["fps"], dtype=torch.float64)
    if c["size"] is not None:
        kw["height"] = torch.tensor([c["size"][0]] * 2)
        kw["width"] = torch.tensor([c["size"][1]] * 2)
    captured = {}
    hook = m.final_layer.register_forward_hook(lambda mod, a, out: captured.update(tok=out))
    with torch.no_grad():
        got = m(z, timestep, y, mask=mask, x_mask=x_mask, **kw)
    hook.remove()
    want, want_tok = ref.forward(P, z, timestep, y, mask=mask, x_mask=x_mask,
                                 fps=kw.get("fps"), height=c["size"] and c["size"][0],
                                 width=c["size"] and c["size"][1], heads=4, depth=2,
                                 input_sq_size=64, return_tokens=True)
    assert got.dtype == torch.float32 and got.shape == (2, 6, 3, c["h"], c["w"])
    assert captured["tok"].dtype == torch.float64
    err = rel_err(captured["tok"], want_tok)
    assert err < tol, f"final-layer tokens: relative error {err}"
    # the model returns float32: equal to the reference rounded to float32 (within 1 ulp)
    assert rel_err(got.double(), want) < max(tol, 1.2e-7)


def test_caption_mask_repeated_for_cfg_batch(float64_pieces):
    # mask [B/2, L] is repeated to the batch (the sampler's [cond, uncond] batch)
    m = make_model(depth=1)
    P = params(m)
    z, timestep, y, _ = inputs()
    half = torch.tensor([[1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        got = m(z, timestep, y, mask=half)
    want = ref.forward(P, z, timestep, y, mask=half, heads=4, depth=1, input_sq_size=64)
    assert rel_err(got.double(), want) < 1.2e-7  # float32 output
    # padded caption tokens are ignored: changing them changes nothing
    y2 = y.clone()
    y2[:, :, 3:] = 123.0
    with torch.no_grad():
        assert torch.equal(m(z, timestep, y2, mask=half), got)


def test_frame_pos_embed_matches_equation():
    m = make_model(temporal_pos_embed=True)
    got = m.temporal_pos_embed(6, torch.float64, "cpu")
    assert got.shape == (6, 32)
    assert (got - ref.frame_pos_embed(6, 32)).abs().max() < 1e-6
    # frames differ, and no weights were added: the state dict is the default model's
    assert (got[1:] - got[:1]).abs().amax(dim=1).min() > 1e-3
    assert list(m.state_dict()) == list(make_model().state_dict())
    with pytest.raises(ValueError, match="temporal_pos_embed"):
        STDiT3(in_channels=3, hidden_size=32, depth=1, num_heads=4, caption_channels=12,
               model_max_length=6, temporal_pos_embed="yes")


@pytest.mark.parametrize("float64", [True, False])
@pytest.mark.parametrize("with_x_mask", [False, True])
def test_whole_model_with_frame_pos_embed(request, float64, with_x_mask):
    """temporal_pos_embed=True (the demo preset) against the reference, same weights."""
    if float64:
        request.getfixturevalue("float64_pieces")
    m = make_model(temporal_pos_embed=True)
    P = params(m)
    z, timestep, y, mask = inputs(h=4, w=6)
    x_mask = torch.tensor([[False, True, True], [True, False, True]]) if with_x_mask else None
    with torch.no_grad():
        got = m(z, timestep, y, mask=mask, x_mask=x_mask)
    kw = dict(mask=mask, x_mask=x_mask, heads=4, depth=2, input_sq_size=64)
    want = ref.forward(P, z, timestep, y, temporal_pos_embed=True, **kw)
    assert rel_err(got.double(), want) < (1.2e-7 if float64 else LOOSE)
    assert rel_err(ref.forward(P, z, timestep, y, **kw), want) > 1e-3  # the embedding matters


def test_reference_is_sensitive():
    """Sanity check of the reference itself: perturbing any ingredient changes its output."""
    m = make_model(depth=1)
    P = params(m)
    z, timestep, y, mask = inputs()
    base = ref.forward(P, z, timestep, y, mask=mask, heads=4, depth=1, input_sq_size=64)
    for key in ("temporal_blocks.0.attn.q_norm.weight", "spatial_blocks.0.cross_attn.proj.bias",
                "fps_embedder.mlp.0.weight", "final_layer.scale_shift_table"):
        P2 = dict(P)
        P2[key] = P[key] * 1.5
        out = ref.forward(P2, z, timestep, y, mask=mask, heads=4, depth=1, input_sq_size=64)
        assert rel_err(out, base) > 1e-4, key
    other = ref.forward(P, z, timestep, y, mask=mask, fps=torch.tensor([12.0]), heads=4,
                        depth=1, input_sq_size=64)
    assert rel_err(other, base) > 1e-4
