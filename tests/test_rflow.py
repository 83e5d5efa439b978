"""Rectified-flow sampler: timesteps, transform, one sampling run and frame conditioning,
checked against numbers computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from opensora_duca.registry import SCHEDULERS, build_module
from opensora_duca.schedulers.rflow import RFlow, timestep_transform


def test_uniform_timesteps():
    ts = RFlow(num_sampling_steps=4).timesteps()
    assert ts.tolist() == [1000.0, 750.0, 500.0, 250.0]
    ts30 = RFlow(num_sampling_steps=30).timesteps()
    assert len(ts30) == 30 and ts30[1].item() == pytest.approx(1000 * 29 / 30)


def test_timestep_transform_by_hand():
    # 512x512, 51 frames -> 51 // 17 * 5 = 15 latent frames -> r = sqrt(1) * sqrt(15)
    # t' = r t / (1 + (r - 1) t) on t / 1000
    ts = RFlow(num_sampling_steps=4, use_timestep_transform=True).timesteps(512, 512, 51)
    expected = [1000.0, 920.7541041893862, 794.7869038423274, 563.5083268962916]
    assert ts.tolist() == pytest.approx(expected, rel=1e-6)
    # 480p 9:16: r = sqrt(480*854/512^2) * sqrt(15) = 4.843119918696522; t=500 -> 828.8585526
    out = timestep_transform(torch.tensor([500.0]), 480, 854, 51)
    assert out.item() == pytest.approx(828.858552637222, rel=1e-6)
    # an image (1 frame) at 256x1024 has r = 1: unchanged
    out = timestep_transform(torch.tensor([300.0]), 256, 1024, 1)
    assert out.item() == pytest.approx(300.0, rel=1e-6)


def test_transform_needs_size():
    with pytest.raises(ValueError, match="height and width"):
        RFlow(num_sampling_steps=2, use_timestep_transform=True).timesteps()


class ToyModel:
    """v = y[b, 0, 0, 0] + 0.5 z (first half of channels); garbage in the second half."""

    def __init__(self):
        self.calls = []

    def __call__(self, z, t, y, mask=None, **kwargs):
        self.calls.append(dict(z=z.clone(), t=t.clone(), y=y.clone(), mask=mask, **kwargs))
        v = y[:, 0, 0, 0].view(-1, 1, 1, 1, 1) + 0.5 * z
        return torch.cat([v, torch.full_like(z, 99.0)], dim=1)


def test_sampling_run_by_hand():
    # y_cond = 2, y_null = 0.5, cfg = 3:
    #   v = v_u + 3 (v_c - v_u) = (0.5 + 0.5 z) + 3 * 1.5 = 5 + 0.5 z
    # ts = [1000, 500], dt = 0.5 each; z0 = 1:
    #   z1 = 1 + (5 + 0.5) * 0.5 = 3.75; z2 = 3.75 + (5 + 1.875) * 0.5 = 7.1875
    model = ToyModel()
    z = torch.ones(1, 2, 3, 2, 2)
    y = torch.full((1, 1, 4, 8), 2.0)
    y_null = torch.full((1, 1, 4, 8), 0.5)
    mask = torch.tensor([[1, 1, 0, 0]])
    out = RFlow(num_sampling_steps=2, cfg_scale=3.0).sample(
        model, z, y, y_null, mask=mask, additional_args=dict(fps=torch.tensor([24.0])),
        progress=False)
    assert torch.allclose(out, torch.full_like(z, 7.1875))
    assert [c["t"].tolist() for c in model.calls] == [[1000.0, 1000.0], [500.0, 500.0]]
    first = model.calls[0]
    assert first["z"].shape[0] == 2 and torch.equal(first["z"][0], first["z"][1])
    assert first["y"][:, 0, 0, 0].tolist() == [2.0, 0.5]
    assert first["mask"].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]  # repeated for the CFG batch
    assert first["fps"].tolist() == [24.0]


def test_cond_mask_holds_reference_frames():
    # frame 0 has mask 0 (never follows: held at its reference), frames 1-2 mask 1 (denoised)
    model = ToyModel()
    z = torch.ones(1, 2, 3, 2, 2)
    x_cond = torch.full_like(z, -4.0)
    cond_mask = torch.tensor([[0.0, 1.0, 1.0]])
    y = torch.full((1, 1, 4, 8), 2.0)
    y_null = torch.full((1, 1, 4, 8), 0.5)
    torch.manual_seed(0)
    out = RFlow(num_sampling_steps=3, cfg_scale=3.0).sample(
        model, z, y, y_null, x_cond=x_cond, cond_mask=cond_mask, progress=False)
    assert torch.equal(out[:, :, 0], x_cond[:, :, 0])
    assert not torch.allclose(out[:, :, 1:], x_cond[:, :, 1:])
    for call in model.calls:
        assert call["x_mask"].tolist() == [[False, True, True]] * 2
        assert torch.equal(call["z"][:, :, 0], x_cond.expand(2, -1, -1, -1, -1)[:, :, 0])
    # frames 1-2 start following at t = 1000: they restart from add_noise(x_cond, noise, 1000)
    # = the noise (as upstream), then take 3 steps of z += (5 + 0.5 z) / 3
    torch.manual_seed(0)
    zz = torch.randn_like(x_cond)[:, :, 1:]
    for _ in range(3):
        zz = zz + (5 + 0.5 * zz) / 3
    assert torch.allclose(out[:, :, 1:], zz, atol=1e-5)


def test_cond_mask_needs_x_cond():
    with pytest.raises(ValueError, match="x_cond"):
        RFlow(num_sampling_steps=1).sample(ToyModel(), torch.ones(1, 2, 3, 2, 2),
                                           torch.ones(1, 1, 4, 8), torch.ones(1, 1, 4, 8),
                                           cond_mask=torch.ones(1, 3), progress=False)


def test_add_noise_and_registry():
    s = build_module(dict(type="rflow", num_sampling_steps=5), SCHEDULERS)
    assert isinstance(s, RFlow) and s.num_sampling_steps == 5
    x0, noise = torch.zeros(2, 1), torch.ones(2, 1)
    out = s.add_noise(x0, noise, torch.tensor([250.0, 1000.0]))
    assert out.flatten().tolist() == [0.25, 1.0]
    assert math.isclose(s.timesteps()[-1].item(), 200.0)


def _upstream_transform_f64(t, height, width, num_frames, version, scale=1.0,
                            scale_temporal=True):
    """Upstream's timestep transform in float64, written from its formula: frames = 1 for an
    image, else num_frames // 17 * 5 (1.2) or (num_frames - 1) // 4 (1.3);
    r = sqrt(H W / 512^2) sqrt(frames) (times scale: always in 1.2, for videos in 1.3);
    t' = r t / (1 + (r - 1) t) on t / 1000."""
    image = num_frames == 1 or (version == "1.3" and not scale_temporal)
    if image:
        frames = 1
    elif version == "1.3":
        frames = (num_frames - 1) // 4
    else:
        frames = num_frames // 17 * 5
    r = math.sqrt(height * width / 512 ** 2) * math.sqrt(frames)
    if version == "1.2" or not image:
        r *= scale
    u = t / 1000
    den = 1 + (r - 1) * u
    return float("nan") if den == 0 and r * u == 0 else r * u / den * 1000


@pytest.mark.parametrize("version, num_frames", [
    ("1.2", 1), ("1.2", 17), ("1.2", 34), ("1.2", 51), ("1.2", 102), ("1.2", 204),
    ("1.3", 1), ("1.3", 5), ("1.3", 6), ("1.3", 33), ("1.3", 113), ("1.3", 204)])
@pytest.mark.parametrize("height, width", [(144, 256), (480, 854), (720, 1280), (1024, 1024)])
def test_transform_matches_upstream_formula_in_float64(version, num_frames, height, width):
    for scale in (1.0, 2.0):
        sched = RFlow(num_sampling_steps=7, use_timestep_transform=True, transform_scale=scale,
                      transform_version=version)
        got = sched.timesteps(height, width, num_frames).tolist()
        raw = [(1 - i / 7) * 1000 for i in range(7)]
        want = [_upstream_transform_f64(t, height, width, num_frames, version, scale)
                for t in raw]
        assert got == pytest.approx(want, rel=2e-6)


@pytest.mark.parametrize("version, frames", [("1.2", range(2, 17)), ("1.3", range(2, 5))])
def test_degenerate_frame_counts_are_refused_where_upstream_gives_nan(version, frames):
    for nf in frames:
        # upstream's value at t = 1000 is 0/0
        assert math.isnan(_upstream_transform_f64(1000.0, 480, 854, nf, version))
        sched = RFlow(num_sampling_steps=4, use_timestep_transform=True,
                      transform_version=version)
        least = 17 if version == "1.2" else 5
        with pytest.raises(ValueError, match=rf"num_frames={nf} is not accepted with "
                                             rf"use_timestep_transform and transform_version="
                                             rf"'{version}'.*accepted: num_frames 1 or >= "
                                             rf"{least}"):
            sched.timesteps(480, 854, nf)
        with pytest.raises(ValueError, match=f"num_frames={nf}"):
            sched.sample(ToyModel(), torch.ones(1, 2, 3, 2, 2), torch.ones(1, 1, 4, 8),
                         torch.ones(1, 1, 4, 8), height=480, width=854, num_frames=nf,
                         progress=False)
        # below t = 1000 upstream's value is finite (0): the same here (training timesteps)
        assert timestep_transform(torch.tensor([999.0, 500.0, 0.0]), 480, 854, nf,
                                  version=version).tolist() == [0.0, 0.0, 0.0]
        t = sched.sample_t(64, generator=torch.Generator().manual_seed(0), height=480,
                           width=854, num_frames=nf)
        assert t.tolist() == [0.0] * 64
        # the neighbours that count one frame or more are accepted
        for ok in (1, least):
            assert torch.isfinite(sched.timesteps(480, 854, ok)).all()
        # so is the same video with scale_temporal=False (one frame) or without the transform
        flat = RFlow(num_sampling_steps=4, use_timestep_transform=True,
                     transform_version=version, scale_temporal=False)
        assert flat.timesteps(480, 854, nf).tolist() == flat.timesteps(480, 854, 1).tolist()
        assert RFlow(num_sampling_steps=4).timesteps(480, 854, nf).tolist() == [
            1000.0, 750.0, 500.0, 250.0]


def test_transform_frame_count_must_be_positive():
    for nf in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"num_frames=.* is not accepted by the timestep "
                                             r"transform; accepted: an int >= 1"):
            timestep_transform(torch.tensor([500.0]), 480, 854, nf)
