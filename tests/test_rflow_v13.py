"""Open-Sora 1.3's rflow options against numbers computed by hand: the 1.3 timestep transform,
oscillation guidance, the flaw fix, and the training time sampler's threshold resampling."""
from __future__ import annotations

import math

import pytest
import torch

from opensora_duca.registry import SCHEDULERS, build_module
from opensora_duca.schedulers.rflow import RFlow, timestep_transform


def test_13_timestep_transform_by_hand():
    # 720p 9:16 (1280 x 720), 113 frames -> (113 - 1) // 4 = 28 frames:
    # r = sqrt(1280 * 720 / 512^2) * sqrt(28) = 1.875 * 5.2915026 = 9.9215674
    sched = RFlow(num_sampling_steps=4, use_timestep_transform=True, transform_version="1.3")
    ts = sched.timesteps(1280, 720, 113)
    assert ts.tolist() == pytest.approx([1000.0, 967.4952160469223, 908.4380508891113,
                                         767.8300237654603], rel=1e-6)
    # transform_scale multiplies r for videos: t = 500 with r = 19.843135 -> 952.02257
    out = timestep_transform(torch.tensor([500.0]), 1280, 720, 113, scale=2.0, version="1.3")
    assert out.item() == pytest.approx(952.0225720356857, rel=1e-6)
    # ... but not for images in 1.3 (1.2 scales them too): 1024^2 image, r = 2 (or 4 in 1.2)
    img13 = timestep_transform(torch.tensor([300.0]), 1024, 1024, 1, scale=2.0, version="1.3")
    img12 = timestep_transform(torch.tensor([300.0]), 1024, 1024, 1, scale=2.0, version="1.2")
    assert img13.item() == pytest.approx(461.5384615384615, rel=1e-6)
    assert img12.item() == pytest.approx(631.578947368421, rel=1e-6)
    # 1.2's frame count for the same video: 113 // 17 * 5 = 30 -> t = 500 -> 911.26726
    v12 = timestep_transform(torch.tensor([500.0]), 1280, 720, 113)
    assert v12.item() == pytest.approx(911.267264581783, rel=1e-6)
    # scale_temporal=False treats the video as one frame (and as an image: no scale)
    flat = timestep_transform(torch.tensor([300.0]), 1024, 1024, 113, scale=2.0, version="1.3",
                              scale_temporal=False)
    assert flat.item() == pytest.approx(461.5384615384615, rel=1e-6)


class FixedModel:
    """Velocity v_c for the first half of the batch, v_u for the second (the CFG batch),
    whatever the input; garbage in the second channel half."""

    def __init__(self, v_c, v_u):
        self.v_c, self.v_u = v_c, v_u

    def __call__(self, z, t, y, mask=None, **kwargs):
        v = torch.cat([self.v_c, self.v_u], 0)
        return torch.cat([v, torch.full_like(v, 99.0)], dim=1)


def _run(sched, v_c, v_u, z):
    y = torch.zeros(1, 1, 2, 3)
    steps = []
    sched.sample(FixedModel(v_c, v_u), z, y, y, progress=False,
                 on_step=lambda i, zz: steps.append(zz.clone()))
    return steps


def test_oscillation_guidance_by_hand():
    # v_c = 1, v_u = 0 everywhere: the step's velocity is the guidance scale g_i.
    # cfg 7.5, force_num 2, 5 steps: g = 7.5, 7.5, 7.5 (step 2 even), 1 (step 3 odd), 7.5;
    # dt = 0.2: z_i = z_{i-1} + g_i * 0.2
    sched = RFlow(num_sampling_steps=5, cfg_scale=7.5, use_oscillation_guidance=True,
                  force_num=2)
    ones = torch.ones(1, 1, 1, 1, 2)
    steps = _run(sched, ones, torch.zeros_like(ones), torch.zeros_like(ones))
    got = [s[0, 0, 0, 0, 0].item() for s in steps]
    assert got == pytest.approx([1.5, 3.0, 4.5, 4.7, 6.2], rel=1e-6)
    # without the option every step uses 7.5
    plain = _run(RFlow(num_sampling_steps=5, cfg_scale=7.5), ones, torch.zeros_like(ones),
                 torch.zeros_like(ones))
    assert plain[3][0, 0, 0, 0, 0].item() == pytest.approx(6.0, rel=1e-6)


def test_flaw_fix_by_hand():
    # one step (dt = 1), cfg 7.5. v_c = [1, 3], v_u = [0, 0]: v = 7.5 v_c = [7.5, 22.5];
    # std(v_c) = sqrt(2), std(v) = 7.5 sqrt(2): factor = 0.7 / 7.5 + 0.3, so
    # v = [7.5, 22.5] * (0.7 / 7.5 + 0.3) = [2.95, 8.85]
    sched = RFlow(num_sampling_steps=1, cfg_scale=7.5, use_flaw_fix=True)
    v_c = torch.tensor([1.0, 3.0]).view(1, 1, 1, 1, 2)
    z = torch.zeros_like(v_c)
    out = _run(sched, v_c, torch.zeros_like(v_c), z)[-1]
    assert out.flatten().tolist() == pytest.approx([2.95, 8.85], rel=1e-6)
    # a second sample with its own statistics: v_c = [2, 2, 2, 6] (mean 3, std 2), v_u =
    # [1, 1, 1, 1]: v = 1 + 7.5 (v_c - 1) = [8.5, 8.5, 8.5, 38.5], std(v) = 15 ->
    # factor 0.7 * 2 / 15 + 0.3 = 0.39333..
    v_c = torch.tensor([[1.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 6.0]]).view(2, 1, 1, 1, 4)
    v_u = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).view(2, 1, 1, 1, 4)
    out = _run(sched, v_c, v_u, torch.zeros_like(v_c))[-1]
    f1 = 0.7 * 2 / 15 + 0.3
    assert out[1].flatten().tolist() == pytest.approx([8.5 * f1] * 3 + [38.5 * f1], rel=1e-6)
    assert out[0].flatten().tolist() == pytest.approx([2.95, 8.85, 2.95, 8.85], rel=1e-6)


def test_uniform_over_threshold_resamples_video_timesteps():
    sched = RFlow(use_timestep_transform=True, transform_version="1.3",
                  uniform_over_threshold=0.95)
    g = torch.Generator().manual_seed(0)
    t = sched.sample_t(4000, generator=g, height=1280, width=720, num_frames=113)
    plain = RFlow(use_timestep_transform=True, transform_version="1.3")
    g = torch.Generator().manual_seed(0)
    base = plain.sample_t(4000, generator=g, height=1280, width=720, num_frames=113)
    over = base > 950
    assert over.float().mean() > 0.3  # r ~ 9.9 pushes many timesteps above 950
    assert torch.equal(t[~over], base[~over])
    assert bool(((t[over] > 950) & (t[over] < 1000)).all())
    # resampled (new values), uniformly: U(950, 1000) has mean 975 and std 50 / sqrt(12)
    assert bool((t[over] != base[over]).all())
    assert abs(t[over].mean().item() - 975) < 2
    assert abs(t[over].std().item() - 50 / 12 ** 0.5) < 1
    # images keep the transformed value
    g = torch.Generator().manual_seed(0)
    img = sched.sample_t(100, generator=g, height=1024, width=1024, num_frames=1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(img, plain.sample_t(100, generator=g, height=1024, width=1024,
                                           num_frames=1))
    # r for the image is sqrt(1024^2 / 512^2) = 2: t' = 2t / (1 + t) on t / 1000
    g = torch.Generator().manual_seed(0)
    raw = RFlow().sample_t(100, generator=g) / 1000
    assert torch.allclose(img, 2 * raw / (1 + raw) * 1000, rtol=1e-5)


@pytest.mark.parametrize("cfg, match", [
    (dict(transform_version="1.4"), "transform_version"),
    (dict(use_flaw_fix="yes"), "use_flaw_fix"),
    (dict(use_oscillation_guidance=1), "use_oscillation_guidance"),
    (dict(force_num=-1), "force_num"),
    (dict(uniform_over_threshold=1.0), "uniform_over_threshold"),
])
def test_bad_13_options(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_module(dict(type="rflow", **cfg), SCHEDULERS)


def test_13_config_values_build():
    sched = build_module(dict(type="rflow", use_timestep_transform=True, num_sampling_steps=30,
                              cfg_scale=7.5, use_oscillation_guidance=True, use_flaw_fix=True,
                              transform_version="1.3"), SCHEDULERS)
    assert sched.use_flaw_fix and sched.force_num == 10
    assert math.isclose(sched.timesteps(1280, 720, 113)[1].item(),
                        timestep_transform(torch.tensor([1000 * 29 / 30]), 1280, 720, 113,
                                           version="1.3").item(), rel_tol=1e-6)
