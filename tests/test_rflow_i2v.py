"""Open-Sora 1.3's three-way i2v / v2v guidance in rflow, against numbers computed by hand from
upstream's formulas: the guided step, the model's [z, z, z] batch, oscillation of the image
scale, scale_image_weight's per-frame weights, SDEdit, and the argument checks."""
from __future__ import annotations

import pytest
import torch

from opensora_duca.registry import SCHEDULERS, build_module
from opensora_duca.schedulers.rflow import RFlow

B, C, T, H, W = 2, 2, 3, 2, 2


class ThirdsModel:
    """Velocity ``v_c`` for the first third of the batch (text + image), ``v_img`` for the
    second (image only), ``v_none`` for the last (neither), whatever the input; garbage in the
    second channel half. Records every call."""

    def __init__(self, v_c, v_img, v_none):
        self.v = (v_c, v_img, v_none)
        self.calls = []

    def __call__(self, z, t, y, mask=None, **kwargs):
        self.calls.append(dict(z=z.clone(), t=t.clone(), y=y.clone(), mask=mask, **kwargs))
        b = z.shape[0] // 3
        v = torch.cat([torch.as_tensor(x, dtype=z.dtype).expand(b, *z.shape[1:])
                       for x in self.v], 0)
        return torch.cat([v, torch.full_like(v, 99.0)], dim=1)


def captions():
    y = torch.full((B, 1, 4, 8), 2.0)
    y_null = torch.full((B, 1, 4, 8), 0.5)
    return y, y_null


def run(sched, model, z=None, z_cond=None, mask_index=(0,), steps=None, **kw):
    z = torch.zeros(B, C, T, H, W) if z is None else z
    z_cond = torch.full_like(z, -3.0) if z_cond is None else z_cond
    y, y_null = captions()
    out = []
    sched.sample(model, z, y, y_null, z_cond=z_cond, mask_index=list(mask_index),
                 progress=False, on_step=lambda i, zz: out.append(zz.clone()), **kw)
    return out


def test_one_three_way_step_by_hand():
    # v_c = 3, v_img = 2, v_none = 0.5; text scale 4, image scale 2:
    #   v = v_none + 2 (v_img - v_none) + 4 (v_c - v_img) = 0.5 + 3 + 4 = 7.5
    # one step: dt = 1000 / 1000 = 1, z = 1 + 7.5 = 8.5 on every frame
    sched = RFlow(num_sampling_steps=1, cfg_scale=4.0)
    out = run(sched, ThirdsModel(3.0, 2.0, 0.5), z=torch.ones(B, C, T, H, W),
              image_cfg_scale=2.0)[-1]
    assert torch.equal(out, torch.full((B, C, T, H, W), 8.5))
    # image_cfg_scale defaults to the text scale (upstream): v = 0.5 + 4 * 1.5 + 4 * 1 = 10.5
    out = run(sched, ThirdsModel(3.0, 2.0, 0.5), z=torch.ones(B, C, T, H, W))[-1]
    assert torch.equal(out, torch.full((B, C, T, H, W), 11.5))
    # guidance_scale overrides the text scale: 0.5 + 2 * 1.5 + 1 * 1 = 4.5 -> z = 5.5
    out = run(sched, ThirdsModel(3.0, 2.0, 0.5), z=torch.ones(B, C, T, H, W),
              image_cfg_scale=2.0, guidance_scale=1.0)[-1]
    assert torch.equal(out, torch.full((B, C, T, H, W), 5.5))


def test_per_sample_velocities_by_hand():
    # sample 0: v_c = 1, v_img = 1, v_none = 0 -> v = image scale 3
    # sample 1: v_c = 5, v_img = 1, v_none = 1 -> v = 1 + 0 + 2 * 4 = 9 (text scale 2)
    # two steps, dt = 0.5 each: z = 0 + 2 * 0.5 v
    sched = RFlow(num_sampling_steps=2, cfg_scale=2.0)
    col = lambda a, b: torch.tensor([a, b]).view(2, 1, 1, 1, 1)  # noqa: E731
    out = run(sched, ThirdsModel(col(1.0, 5.0), col(1.0, 1.0), col(0.0, 1.0)),
              image_cfg_scale=3.0)
    assert out[0][0].unique().tolist() == [1.5] and out[0][1].unique().tolist() == [4.5]
    assert out[1][0].unique().tolist() == [3.0] and out[1][1].unique().tolist() == [9.0]


def test_model_gets_the_three_way_batch():
    sched = RFlow(num_sampling_steps=2, cfg_scale=4.0)
    model = ThirdsModel(1.0, 1.0, 1.0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, C, T, H, W, generator=g)
    z_cond = torch.randn(B, C, T, H, W, generator=g)  # non-zero on every frame
    y, y_null = captions()
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    sched.sample(model, z, y, y_null, mask=mask, z_cond=z_cond, mask_index=[0, 2],
                 additional_args=dict(fps=torch.tensor([24.0, 24.0])), progress=False)
    assert len(model.calls) == 2
    first = model.calls[0]
    assert torch.equal(first["z"], torch.cat([z, z, z]))
    assert first["t"].tolist() == [1000.0] * 6
    assert model.calls[1]["t"].tolist() == [500.0] * 6
    assert torch.equal(first["y"], torch.cat([y, y_null, y_null]))
    assert torch.equal(first["y_null"], torch.cat([y_null] * 3))  # the null caption, 3B rows
    assert torch.equal(first["mask"], torch.cat([mask] * 3))
    assert first["mask_index"] == [0, 2]
    assert first["fps"].tolist() == [24.0, 24.0]
    # the default z_cond_mask: 1 on the given frames; z_cond is multiplied by it (upstream)
    m = torch.zeros_like(z)
    m[:, :, [0, 2]] = 1
    given = z_cond * m
    assert torch.equal(first["cond_mask"], torch.cat([m, m, m]))
    assert torch.equal(first["cond"], torch.cat([given, given, torch.zeros_like(z)]))
    assert "x_mask" not in first
    # an explicit z_cond_mask is used as given
    model = ThirdsModel(1.0, 1.0, 1.0)
    own = torch.zeros_like(z)
    own[:, :, 1] = 1
    sched.sample(model, z, y, y_null, z_cond=z_cond, z_cond_mask=own, mask_index=[1],
                 progress=False)
    assert torch.equal(model.calls[0]["cond"][:B], z_cond * own)


def test_empty_mask_index_is_the_two_way_run():
    # upstream: an empty mask_index runs the two-way guidance without cond (z_cond, the image
    # scale and SDEdit unused); v_c = 3 for the first half, v_u = 2 for the second
    class Halves:
        def __init__(self):
            self.calls = []

        def __call__(self, z, t, y, mask=None, **kwargs):
            self.calls.append(kwargs)
            b = z.shape[0] // 2
            v = torch.cat([torch.full_like(z[:b], 3.0), torch.full_like(z[:b], 2.0)])
            return torch.cat([v, v], 1)

    y, y_null = captions()
    for mask_index in (None, []):
        model = Halves()
        out = RFlow(num_sampling_steps=1, cfg_scale=4.0).sample(
            model, torch.zeros(B, C, T, H, W), y, y_null, z_cond=torch.ones(B, C, T, H, W),
            mask_index=mask_index, image_cfg_scale=9.0, use_sdedit=True, progress=False)
        assert torch.equal(out, torch.full_like(out, 6.0))  # 2 + 4 * (3 - 2)
        assert model.calls == [{}]


def test_image_oscillation_by_hand():
    # v_c = v_img = 1, v_none = 0: v = the image scale g_i. image_cfg 3, force_num 2,
    # 5 steps: g_i = 3, 3, 3 (step 2 even), 1 (step 3 odd), 3; dt = 0.2
    ones = dict(v_c=1.0, v_img=1.0, v_none=0.0)
    sched = RFlow(num_sampling_steps=5, cfg_scale=7.0, force_num=2)
    steps = run(sched, ThirdsModel(*ones.values()), image_cfg_scale=3.0,
                use_oscillation_guidance_for_image=True)
    assert [s[0, 0, 0, 0, 0].item() for s in steps] == pytest.approx([0.6, 1.2, 1.8, 2.0, 2.6])
    # the text switch does not touch the image scale: every step 3
    steps = run(sched, ThirdsModel(*ones.values()), image_cfg_scale=3.0,
                use_oscillation_guidance_for_text=True)
    assert steps[3][0, 0, 0, 0, 0].item() == pytest.approx(2.4)
    # both switches default to the scheduler's use_oscillation_guidance; an explicit False wins
    osc = RFlow(num_sampling_steps=5, cfg_scale=7.0, force_num=2, use_oscillation_guidance=True)
    steps = run(osc, ThirdsModel(*ones.values()), image_cfg_scale=3.0)
    assert steps[3][0, 0, 0, 0, 0].item() == pytest.approx(2.0)
    steps = run(osc, ThirdsModel(*ones.values()), image_cfg_scale=3.0,
                use_oscillation_guidance_for_image=False)
    assert steps[3][0, 0, 0, 0, 0].item() == pytest.approx(2.4)


def test_text_oscillation_by_hand():
    # v_c = 1, v_img = v_none = 0: v = the text scale g_t; cfg 5, force_num 1, 3 steps:
    # g_t = 5 (step 0 < force_num), 1 (step 1 odd), 5 (step 2 even); dt = 1/3
    sched = RFlow(num_sampling_steps=3, cfg_scale=5.0, force_num=1)
    steps = run(sched, ThirdsModel(1.0, 0.0, 0.0), use_oscillation_guidance_for_text=True)
    assert [s[0, 0, 0, 0, 0].item() for s in steps] == pytest.approx([5 / 3, 2.0, 11 / 3])
    steps = run(sched, ThirdsModel(1.0, 0.0, 0.0))
    assert steps[1][0, 0, 0, 0, 0].item() == pytest.approx(10 / 3)


def test_scale_image_weight_by_hand():
    # upstream: at step i the last frame's weight is linspace(g, init, steps)[i] (from g at the
    # first step down to init at the last) and the frames rise linearly from init (frame 0)
    # to it. g = 5, init 1, 5 steps: top = 5, 4, 3, 2, 1; 3 frames: [1, (1 + top) / 2, top]
    sched = RFlow(num_sampling_steps=5, scale_image_weight=True, initial_image_scale=1.0)
    expect = [[1, 3, 5], [1, 2.5, 4], [1, 2, 3], [1, 1.5, 2], [1, 1, 1]]
    for i, row in enumerate(expect):
        assert sched.image_guidance_weights(5.0, i, 5, 3).tolist() == row
    assert sched.image_guidance_weights(5.0, 0, 1, 1).tolist() == [1.0]  # one step, one frame
    # in the sampler: v_c = v_img = 1, v_none = 0 -> v = the weight of each frame; dt = 0.2
    steps = run(sched, ThirdsModel(1.0, 1.0, 0.0), image_cfg_scale=5.0)
    z = torch.zeros(3)
    for i, row in enumerate(expect):
        z = z + torch.tensor(row, dtype=torch.float32) * 0.2
        got = steps[i][:, :, :, 0, 0]  # [B, C, T]
        assert torch.allclose(got, z.expand(B, C, T), atol=1e-6), (i, got[0, 0], z)
    # without the option every frame gets 5: z = 5 after 5 steps of 0.2
    plain = run(RFlow(num_sampling_steps=5), ThirdsModel(1.0, 1.0, 0.0), image_cfg_scale=5.0)
    assert torch.allclose(plain[-1], torch.full((B, C, T, H, W), 5.0))


def test_scale_image_weight_only_above_initial_scale():
    # initial_image_scale 2, image scale 3 oscillated (force_num 0): step 0 (even) weighs the
    # frames [2, 3] (top = linspace(3, 2, 2)[0] = 3); step 1 (odd) has g = 1 <= 2: a plain 1
    sched = RFlow(num_sampling_steps=2, scale_image_weight=True, initial_image_scale=2.0,
                  force_num=0)
    z = torch.zeros(B, C, 2, H, W)
    steps = run(sched, ThirdsModel(1.0, 1.0, 0.0), z=z, image_cfg_scale=3.0,
                use_oscillation_guidance_for_image=True)
    assert steps[0][0, 0, :, 0, 0].tolist() == pytest.approx([1.0, 1.5])
    assert steps[1][0, 0, :, 0, 0].tolist() == pytest.approx([1.5, 2.0])
    # an image scale at or below initial_image_scale is used as it is on every frame
    steps = run(sched, ThirdsModel(1.0, 1.0, 0.0), z=z, image_cfg_scale=2.0)
    assert steps[-1][0, 0, :, 0, 0].tolist() == pytest.approx([2.0, 2.0])


def test_flaw_fix_is_two_way_only():
    # upstream applies the flaw fix in its two-way branch only
    a = run(RFlow(num_sampling_steps=2, use_flaw_fix=True), ThirdsModel(3.0, 2.0, 0.5),
            image_cfg_scale=2.0)[-1]
    b = run(RFlow(num_sampling_steps=2), ThirdsModel(3.0, 2.0, 0.5), image_cfg_scale=2.0)[-1]
    assert torch.equal(a, b)


def test_sdedit_overwrites_given_frames_with_fresh_noise():
    # frames 0 and 2 given. Before every step they become add_noise(z_cond, fresh noise, t)
    # = (1 - t/1000) z_cond + t/1000 noise; frame 1 follows the sampler. v = 1 everywhere
    # (v_c = v_img = v_none = 1); 3 steps: t = 1000, 666.67, 333.33, dt = 1/3
    sched = RFlow(num_sampling_steps=3)
    model = ThirdsModel(1.0, 1.0, 1.0)
    z_cond = torch.full((B, C, T, H, W), -3.0)
    gens = [torch.Generator().manual_seed(10 + j) for j in range(B)]
    steps = run(sched, model, z_cond=z_cond, mask_index=[0, 2], use_sdedit=True,
                generators=gens)
    ts = sched.timesteps().tolist()
    ref = [torch.Generator().manual_seed(10 + j) for j in range(B)]
    noises = []
    follow = torch.zeros(B, C, H, W)  # frame 1
    for i, t in enumerate(ts):
        noise = torch.stack([torch.randn(C, T, H, W, generator=g) for g in ref])
        noises.append(noise)
        seen = model.calls[i]["z"][:B]  # the first third: z as the model saw it
        tau = t / 1000
        expect = (1 - tau) * -3.0 + tau * noise
        assert torch.allclose(seen[:, :, [0, 2]], expect[:, :, [0, 2]], atol=1e-6)
        assert torch.allclose(seen[:, :, 1], follow, atol=1e-6)  # not overwritten
        follow = follow + 1 / 3
        # after the step: the overwritten frames moved by v dt from there
        assert torch.allclose(steps[i][:, :, [0, 2]], expect[:, :, [0, 2]] + 1 / 3, atol=1e-6)
    assert not torch.allclose(noises[0], noises[1])  # fresh noise every step
    # step 0 (t = 1000) is pure noise: the reference does not show yet
    assert torch.allclose(model.calls[0]["z"][:B, :, 0], noises[0][:, :, 0])
    # without SDEdit the given frames follow the sampler like the others
    model = ThirdsModel(1.0, 1.0, 1.0)
    run(sched, model, z_cond=z_cond, mask_index=[0, 2])
    assert torch.allclose(model.calls[2]["z"][:B], torch.full((B, C, T, H, W), 2 / 3))


def test_sdedit_default_noise_is_the_global_generator():
    sched = RFlow(num_sampling_steps=2)
    model = ThirdsModel(0.0, 0.0, 0.0)
    z_cond = torch.zeros(B, C, T, H, W)
    torch.manual_seed(123)
    run(sched, model, z_cond=z_cond, use_sdedit=True)
    torch.manual_seed(123)
    n0, n1 = torch.randn(B, C, T, H, W), torch.randn(B, C, T, H, W)
    assert torch.equal(model.calls[0]["z"][:B, :, 0], n0[:, :, 0])  # t = 1000: the noise
    assert torch.allclose(model.calls[1]["z"][:B, :, 0], 0.5 * n1[:, :, 0])  # t = 500


def test_sdedit_noise_per_sample_does_not_depend_on_the_batch():
    sched = RFlow(num_sampling_steps=2)
    z_cond = torch.randn(B, C, T, H, W, generator=torch.Generator().manual_seed(1))
    both = run(sched, ThirdsModel(0.3, 0.2, 0.1), z_cond=z_cond, use_sdedit=True,
               generators=[torch.Generator().manual_seed(s) for s in (5, 6)])[-1]
    y, y_null = captions()
    alone = RFlow(num_sampling_steps=2).sample(
        ThirdsModel(0.3, 0.2, 0.1), torch.zeros(1, C, T, H, W), y[1:], y_null[1:],
        z_cond=z_cond[1:], mask_index=[0], use_sdedit=True, progress=False,
        generators=[torch.Generator().manual_seed(6)])
    assert torch.equal(both[1:], alone)


class NoCFGParallel:
    """Stands for a CFGParallel layout (only its presence is checked)."""


@pytest.mark.parametrize("kw, match", [
    (dict(mask_index=[3]), r"mask_index=\[3\]; accepted: None or distinct latent frame "
                           r"indices in 0\.\.2"),
    (dict(mask_index=[0, 0]), "mask_index"),
    (dict(mask_index=[True]), "mask_index"),
    (dict(mask_index=[0], z_cond=None), r"z_cond=None with mask_index=\[0\]; accepted: a tensor"),
    (dict(mask_index=[0], z_cond=torch.zeros(B, C, 2, H, W)), "z_cond=.*shaped like z"),
    (dict(mask_index=[0], z_cond_mask=torch.zeros(B, T)), r"z_cond_mask=\(2, 3\)"),
    (dict(mask_index=[0], cfg_parallel=NoCFGParallel()), "cfg_parallel=2 is not accepted with "
                                                         "i2v / v2v guidance"),
    (dict(mask_index=[0], x_cond=torch.zeros(B, C, T, H, W), cond_mask=torch.ones(B, T)),
     "not accepted together with x_cond / cond_mask"),
    (dict(use_sdedit="yes"), r"use_sdedit='yes'; accepted: True or False"),
    (dict(image_cfg_scale=float("nan")), r"image_cfg_scale=nan; accepted"),
    (dict(image_cfg_scale="7"), "image_cfg_scale"),
    (dict(use_oscillation_guidance_for_text=1), "use_oscillation_guidance_for_text=1"),
    (dict(use_oscillation_guidance_for_image="no"), "use_oscillation_guidance_for_image"),
    (dict(mask_index=[0], generators=[torch.Generator()]), "generators=.*one torch.Generator "
                                                           r"per sample \(2\)"),
])
def test_bad_sample_arguments_fail_before_the_model_runs(kw, match):
    model = ThirdsModel(1.0, 1.0, 1.0)
    kw = dict(kw)
    z_cond = kw.pop("z_cond", torch.zeros(B, C, T, H, W))
    y, y_null = captions()
    with pytest.raises(ValueError, match=match):
        RFlow(num_sampling_steps=2).sample(model, torch.zeros(B, C, T, H, W), y, y_null,
                                           z_cond=z_cond, progress=False, **kw)
    assert model.calls == []


@pytest.mark.parametrize("cfg, match", [
    (dict(scale_image_weight="yes"), r"scale_image_weight='yes'; accepted: True or False"),
    (dict(initial_image_scale=float("inf")), "initial_image_scale=inf; accepted: a finite"),
    (dict(initial_image_scale=True), "initial_image_scale=True"),
])
def test_bad_scheduler_options(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_module(dict(type="rflow", **cfg), SCHEDULERS)


def test_upstream_13_i2v_scheduler_config_builds():
    # configs/opensora-v1-3/inference/v2v.py of upstream 1.3
    sched = build_module(dict(type="rflow", use_timestep_transform=True, num_sampling_steps=30,
                              cfg_scale=7.5, scale_image_weight=True, initial_image_scale=1.0),
                         SCHEDULERS)
    assert sched.scale_image_weight and sched.initial_image_scale == 1.0


def test_bfloat16_latents_become_float32_as_upstream():
    # upstream's update z + v * dt has a float32 dt of batch shape: the latents of a bf16 run
    # are float32 from the first step on, and the model gets float32 timesteps
    sched = RFlow(num_sampling_steps=2, scale_image_weight=True)
    z = torch.zeros(B, C, T, H, W, dtype=torch.bfloat16)
    model = ThirdsModel(1.0, 1.0, 0.0)
    out = run(sched, model, z=z, z_cond=torch.ones_like(z), image_cfg_scale=3.0,
              use_sdedit=True)
    assert all(s.dtype == torch.float32 for s in out)
    # SDEdit's noisy frames are float32 (upstream's add_noise): float32 at step 0 already
    assert [c["z"].dtype for c in model.calls] == [torch.float32, torch.float32]
    assert all(c["t"].dtype == torch.float32 for c in model.calls)
    assert torch.isfinite(out[-1]).all()
    model = ThirdsModel(1.0, 1.0, 0.0)
    out = run(sched, model, z=z, z_cond=torch.ones_like(z), image_cfg_scale=3.0)
    assert [c["z"].dtype for c in model.calls] == [torch.bfloat16, torch.float32]
    assert out[-1].dtype == torch.float32
