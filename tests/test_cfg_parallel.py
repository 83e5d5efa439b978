"""CFG parallelism (gloo, CPU): the conditional and unconditional halves of the guidance batch on
two groups of ranks give the single-process latents (2 ranks CFG only, 4 ranks CFG x SP(2)),
uncached and with DuCa; per step one combine all_gather between the groups, and cached steps
issue no collective inside the trunk."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from dist_utils import free_port, observe_collectives, run_distributed

from opensora_duca.cache import build_policy
from opensora_duca.config_check import check_inference_config, check_video_fits
from opensora_duca.parallel.cfg import check_cache_policy, check_degree, setup_cfg_parallel
from opensora_duca.pipeline import build_from_config
from opensora_duca.schedulers.rflow import RFlow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle moving left", "a blue square staying still"]
STEPS = 10
DEPTH = 2
# DuCa scores tokens per sample (vnorm); with the random scorer each half draws from the whole
# batch's numbers
CACHES = {"uncached": None, "duca": dict(type="DuCa"),
          "duca_random": dict(type="DuCa", scorer="random")}


def _cfg(**over):
    cfg = dict(image_size=(32, 40), num_frames=3, fps=8, seed=5, dtype="fp32", batch_size=2,
               model=dict(type="STDiT3-S/2", depth=DEPTH, hidden_size=64, num_heads=4),
               vae=dict(type="DemoCodec"),
               text_encoder=dict(type="DemoTextEncoder", output_dim=32, model_max_length=8),
               # 3 frames: the 1.2 transform's frame factor 3 // 17 * 5 is 0; counted as 1
               scheduler=dict(type="rflow", num_sampling_steps=STEPS, cfg_scale=5.0,
                              use_timestep_transform=True, scale_temporal=False))
    cfg.update(over)
    return cfg


def _pipe(cache, **over):
    """A pipeline whose random weights are all non-zero (the upstream init zeroes the final
    layer and the temporal projections, which would make every output agree trivially)."""
    pipe = build_from_config(_cfg(cache=cache, **over), device="cpu",
                             enable_sequence_parallelism=dist.is_initialized())
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in pipe.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return pipe


def _generate(pipe):
    return pipe.generate(PROMPTS)["latents"]


def _conditioned(cfg_parallel=None):
    """The sampler alone with reference frames (x_cond, cond_mask: the model gets x_mask, and
    noise is drawn when a frame starts following) and a caption mask given for the whole
    guidance batch (2B rows, the null half different)."""
    from cache_utils import inputs, small_model
    model = small_model(enable_sequence_parallelism=True)
    z, y, mask = inputs(h=8, w=10)
    g = torch.Generator().manual_seed(4)
    y_null, x_cond = torch.randn(y.shape, generator=g), torch.randn(z.shape, generator=g)
    null_mask = torch.ones_like(mask)
    null_mask[1, 3:] = 0
    cond_mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.5, 1.0]])
    torch.manual_seed(3)
    return RFlow(num_sampling_steps=6, cfg_scale=4.0).sample(
        model, z, y, y_null, mask=torch.cat([mask, null_mask]), x_cond=x_cond,
        cond_mask=cond_mask, progress=False, cfg_parallel=cfg_parallel)




def _count_collectives(pipe):
    """Latents, step labels and per model call the collectives issued: (name, inside the trunk,
    which group: "pair" (the CFG pair), "sp" or "other"), the combine counted with its call."""
    par, model = pipe.cfg_parallel, pipe.model
    steps, in_trunk = [], {"on": False}

    def record(name, k):
        group = k.get("group")
        kind = "pair" if group is par.pair_group else "sp" if group is par.sp_group else "other"
        steps[-1].append((name, in_trunk["on"], kind))

    hooks = [model.register_forward_pre_hook(lambda *a: steps.append([])),
             model.spatial_blocks[0].register_forward_pre_hook(
                 lambda *a: in_trunk.__setitem__("on", True)),
             model.temporal_blocks[-1].register_forward_hook(
                 lambda *a: in_trunk.__setitem__("on", False))]
    try:
        with observe_collectives(record):
            latents = _generate(pipe)
    finally:
        for h in hooks:
            h.remove()
    return latents, pipe.cache_manager.stats()["step_labels"], steps


def _worker(rank, world):
    out = {name: _generate(_pipe(cache, cfg_parallel=2)) for name, cache in CACHES.items()}
    out["conditioned"] = _conditioned(setup_cfg_parallel(2))
    pipe = _pipe(dict(type="DuCa"), cfg_parallel=2)
    out["layout"] = (pipe.cfg_parallel.cfg_rank, pipe.cfg_parallel.sp_rank,
                     pipe.cfg_parallel.sp_degree)
    out["counted"], out["labels"], out["steps"] = _count_collectives(pipe)
    for cache in (dict(type="TeaCache"), dict(type="DuCa", cfg_shared_selection=True)):
        try:
            _pipe(cache, cfg_parallel=2)
            out.setdefault("refused", []).append(None)
        except ValueError as err:
            out.setdefault("refused", []).append(str(err))
    return out


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    out = {name: _generate(_pipe(cache)) for name, cache in CACHES.items()}
    out["conditioned"] = _conditioned()
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["cfg2", "cfg2xsp2"])
def results(request):
    return request.param, run_distributed(_worker, request.param)


def test_same_latents_as_one_process_on_every_rank(single, results):
    world, res = results
    for name in [*CACHES, "conditioned"]:
        for r in range(world):
            assert torch.equal(res[r][name], res[0][name]), (name, r)  # every rank guides alike
        err = (res[0][name] - single[name]).abs().max().item()
        assert err < 1e-4, (name, world, err)
    assert (single["duca"] - single["uncached"]).abs().max().item() > 1e-3  # DuCa did cache
    p = world // 2
    assert [x["layout"] for x in res] == [(r // p, r % p, p) for r in range(world)]


def test_one_combine_per_step_and_none_inside_cached_trunks(results):
    world, res = results
    sp = world > 2
    for r in range(world):
        labels, steps = res[r]["labels"], res[r]["steps"]
        assert len(steps) == STEPS and "conservative" in labels and "aggressive" in labels
        for step, (label, calls) in enumerate(zip(labels, steps)):
            inside = [c for c in calls if c[1]]
            outside = [c for c in calls if not c[1]]
            # the rows of the sequence-parallel group gathered before the final layer, then
            # the halves of the guidance batch exchanged once
            expected = ([("all_gather", False, "sp")] if sp else []) + [
                ("all_gather", False, "pair")]
            assert outside == expected, (r, step, label, outside)
            if label in ("full", "full (cross-attn reused)") and sp:
                assert inside == [("all_to_all_single", True, "sp")] * (2 * DEPTH), (r, step)
            else:
                assert inside == [], (r, step, label, inside)
        torch.testing.assert_close(res[r]["counted"], res[r]["duca"], rtol=0, atol=0)


def test_policies_coupling_the_halves_are_refused(results):
    _, res = results
    tea, shared = res[0]["refused"]
    assert tea is not None and "TeaCache" in tea and "cfg_parallel=2" in tea
    assert shared is not None and "cfg_shared_selection" in shared
    check_cache_policy(build_policy(dict(type="DuCa")))  # a fixed per-sample plan is accepted


def test_bad_degree_is_one_line():
    for bad in (3, 0, True, "2", 2.5):
        with pytest.raises(ValueError, match="cfg_parallel=.*accepted: 1 .off. or 2"):
            check_degree(bad)
    assert check_degree(None) == 1 and check_degree(2) == 2
    with pytest.raises(ValueError, match="cfg_parallel=2 needs a world size divisible by 2; "
                                         "this run has 1 rank"):
        build_from_config(_cfg(cfg_parallel=2), device="cpu")


def test_config_check_knows_the_key_and_the_memory_of_a_half(monkeypatch):
    cfg = _cfg(cfg_parallel=2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    check_inference_config(cfg)
    for world, value, msg in (("3", 2, "needs a world size divisible by 2; this run has 3"),
                              ("4", 4, "cfg_parallel=4 is not accepted")):
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(ValueError, match=msg):
            check_inference_config(_cfg(cfg_parallel=value))
    # one hidden state of batch x tokens instead of 2 x batch x tokens (each rank runs a half):
    # 2 frames of 64 x 128, batch 3, hidden 16 -> 3*ceil(2*64*128/1024)*16*4 bytes
    video, half = 3 * 3 * 2 * 64 * 128 * 4, 3 * 16 * 16 * 4
    check_video_fits(2, (64, 128), 3, 16, video + half, None, cfg_copies=1)
    with pytest.raises(ValueError, match="cannot fit"):
        check_video_fits(2, (64, 128), 3, 16, video + half, None)


def _tool(args, nproc=1, timeout=240):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "inference.py"),
           os.path.join(ROOT, "configs", "tiny", "inference.py"), "--no-progress", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *cmd[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_tool_cfg_parallel_matches_single_process(tmp_path):
    common = ["--prompt", PROMPTS[0], "--num-sampling-steps", "4", "--save-latents"]
    one = _tool(["--save-dir", str(tmp_path / "one"), *common])
    assert one.returncode == 0, one.stderr
    two = _tool(["--save-dir", str(tmp_path / "two"), "--cfg-parallel", "2", *common], nproc=2)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "ranks: 2 (CFG parallel: 2 groups of 1 rank(s))" in two.stdout
    a = torch.load(tmp_path / "one" / "sample_0000.latents.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "sample_0000.latents.pt", weights_only=True)
    assert (a - b).abs().max().item() < 1e-4
    for value, msg in (("3", "cfg_parallel=3 is not accepted"),
                       ("2", "cfg_parallel=2 needs a world size divisible by 2")):
        bad = _tool(["--save-dir", str(tmp_path / "bad"), "--cfg-parallel", value, *common])
        assert bad.returncode == 2 and msg in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
