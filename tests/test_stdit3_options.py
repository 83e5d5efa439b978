"""STDiT3's upstream options and forward keywords: each one has its upstream effect or a clear
error; nothing is silently ignored."""
from __future__ import annotations

import inspect

import pytest
import torch

from opensora_duca.models.layers import DropPath
from opensora_duca.models.stdit3 import UPSTREAM_IGNORED_ARGS, STDiT3

KW = dict(in_channels=3, hidden_size=32, depth=2, num_heads=4, caption_channels=12,
          model_max_length=6, input_sq_size=64)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return STDiT3(**{**KW, **kw}).eval()


def inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 3, 3, 4, 6, generator=g)
    y = torch.randn(b, 1, 6, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])[:b]
    return z, torch.tensor([812.5, 37.0])[:b], y, mask


def randomise(m, seed=1):
    """Every weight non-zero (temporal blocks start with zero projections)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "rope.freqs":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def test_upstream_sampler_keywords_are_accepted_and_ignored():
    m = make()
    z, t, y, mask = inputs()
    size = dict(height=torch.tensor([64.0, 64.0]), width=torch.tensor([96.0, 96.0]),
                fps=torch.tensor([24.0, 24.0]))
    with torch.no_grad():
        plain = m(z, t, y, mask=mask, **size)
        # what Open-Sora 1.2's rflow passes: text encoder output, multi-resolution info, x_mask
        upstream = m(z, t, y=y, mask=mask, x_mask=None, num_frames=torch.tensor([51.0, 51.0]),
                     ar=torch.tensor([0.67, 0.67]), **size)
    assert UPSTREAM_IGNORED_ARGS == ("num_frames", "ar")
    assert torch.equal(plain, upstream)
    with pytest.raises(TypeError, match=r"unexpected arguments \['bogus'\].*'num_frames', 'ar'"):
        m(z, t, y, mask=mask, num_frames=51, bogus=1)


def test_unknown_forward_argument_error_lists_every_accepted_one():
    m = make()
    z, t, y, mask = inputs()
    with pytest.raises(TypeError) as err:
        m(z, t, y, mask=mask, bogus=1)
    msg = str(err.value)
    accepted = ["x", "timestep", "y", "mask", "x_mask", "fps", "height", "width", "cond",
                "cond_mask", "mask_index", "y_null", "text_uncond_prob"]
    # exactly the signature's named arguments, in its order, then the ignored upstream ones
    assert f"accepted: {accepted}, and ['num_frames', 'ar'] (ignored" in msg
    params = [k for k in inspect.signature(STDiT3.forward).parameters if k not in ("self",
                                                                                  "kwargs")]
    assert params == accepted


@pytest.mark.parametrize("key", ["enable_layernorm_kernel", "skip_y_embedder",
                                 "only_train_temporal", "freeze_y_embedder", "qk_norm"])
def test_boolean_options_reject_other_values(key):
    with pytest.raises(ValueError, match=rf"STDiT3 {key}='yes': accepted: True or False"):
        make(**{key: "yes"})


@pytest.mark.parametrize("bad", [-0.1, 1.0, "0.1", True])
def test_drop_path_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=r"STDiT3 drop_path=.*accepted: a number in \[0, 1\)"):
        make(drop_path=bad)


def test_drop_path_rates_and_eval_identity():
    m = make(drop_path=0.3)
    for blocks in (m.spatial_blocks, m.temporal_blocks):
        assert isinstance(blocks[0].drop_path, torch.nn.Identity)  # rate 0 on the first block
        assert isinstance(blocks[1].drop_path, DropPath) and blocks[1].drop_path.p == \
            pytest.approx(0.3)
    ref = randomise(make())
    m.load_state_dict(ref.state_dict())
    z, t, y, mask = inputs()
    with torch.no_grad():
        assert torch.equal(m(z, t, y, mask=mask), ref(z, t, y, mask=mask))


def test_drop_path_drops_whole_samples_in_training():
    dp = DropPath(0.5).train()
    torch.manual_seed(0)
    out = dp(torch.ones(4000, 2, 3))
    per_sample = out.reshape(4000, -1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 2).all(1))  # 0 or 1 / (1 - p)
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.5) < 0.05
    assert torch.equal(dp.eval()(torch.ones(3, 2)), torch.ones(3, 2))


def test_only_train_temporal_and_freeze_y_embedder():
    m = make(only_train_temporal=True)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in m.named_parameters() if n.startswith("temporal_blocks.")}
    m = make(freeze_y_embedder=True)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {"rope.freqs", "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc1.bias",
                      "y_embedder.y_proj.fc2.weight", "y_embedder.y_proj.fc2.bias"}


def test_layernorm_kernel_option_is_accepted_and_changes_nothing():
    a, b = randomise(make()), make(enable_layernorm_kernel=True)
    b.load_state_dict(a.state_dict())
    z, t, y, mask = inputs()
    with torch.no_grad():
        assert torch.equal(a(z, t, y, mask=mask), b(z, t, y, mask=mask))


def test_skip_y_embedder_takes_embedded_captions_and_lengths():
    a = randomise(make())
    b = make(skip_y_embedder=True)
    b.load_state_dict(a.state_dict())
    z, t, y, mask = inputs()
    with torch.no_grad():
        want = a(z, t, y, mask=mask)
        y_emb = a.y_embedder.y_proj(y)  # [B, 1, L, hidden]
        assert torch.equal(b(z, t, y_emb, mask=mask), want)
        # upstream passes per-sample valid lengths as ``mask`` with skip_y_embedder
        assert torch.equal(b(z, t, y_emb, mask=torch.tensor([4, 2])), want)
        assert torch.equal(b(z, t, y_emb, mask=[4, 2]), want)
        full = a(z, t, y)
        assert torch.equal(b(z, t, y_emb, mask=6), full)
        assert not torch.equal(full, want)
    with pytest.raises(ValueError, match=r"mask=\[4, 9\]: with skip_y_embedder.*each in 1\.\.6"):
        b(z, t, y_emb, mask=[4, 9])
    with pytest.raises(ValueError, match=r"y: expected caption embedding \[2, 1, L, 32\] "
                                         r"\(already embedded"):
        b(z, t, y, mask=mask)
