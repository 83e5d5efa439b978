"""The caches on Open-Sora 2.0's MMDiT (cache/layouts/mmdit.py), on this project's model and on
the upstream-shaped double (tests/upstream_mmdit.py), checked against independent references:

* policy ``none`` is bitwise the uncached model;
* the token-sparse reused step is the math of the block with its attention outputs taken from
  an earlier step: the double run uncached with those outputs forced in by forward hooks;
* every policy runs with its plan counted at the submodules, and the analytic FLOPs of full and
  reused steps equal what torch's FLOP counter measures while the step runs;
* the three-branch guidance batch (text, unconditional, image-unconditional: one clip's rows)
  decides per clip: a clip alone and beside another takes the same decisions;
* upstream's booster (processors swapped, the model's forward replaced) before or after the
  cache is attached changes nothing.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from cache_utils import Scripted, plan_of
from dist_utils import free_port
from upstream_mmdit import build_double, make_inputs, shard_mmdit, small_config

from opensora_duca.cache import apply_cache, get_cache_manager, remove_cache
from opensora_duca.cache.plan import Action
from opensora_duca.models.mmdit import MMDiTConfig, MMDiTModel

STEPS = 8


def ours(seed: int = 0, **overrides) -> MMDiTModel:
    """This project's MMDiT with the double's weights."""
    double = build_double(seed, **overrides)
    model = MMDiTModel(MMDiTConfig(**vars(small_config(**overrides)))).eval()
    model.load_state_dict(double.state_dict())
    return model


@torch.no_grad()
def sample(model, inp, steps: int = STEPS, session: bool = True):
    """A flow-matching Euler loop shaped as upstream's (keyword calls, timesteps in [0, 1])."""
    img, outs = inp["img"].clone(), []
    ts = [1 - i / steps for i in range(steps + 1)]
    mgr = get_cache_manager(model)

    def loop():
        nonlocal img
        for t, t_next in zip(ts[:-1], ts[1:]):
            out = model(**dict(inp, img=img, timesteps=torch.full((img.shape[0],), t)))
            outs.append(out)
            img = img + (t_next - t) * 0.3 * out
    if mgr is not None and session:
        with mgr.session(num_steps=steps, timesteps=ts[:-1]):
            loop()
    else:
        loop()
    return outs


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def model_and_inputs():
    model = ours()
    return model, make_inputs(small_config(), grid=(2, 3, 4), batch=2)


def test_policy_none_is_bitwise(model_and_inputs):
    model, inp = model_and_inputs
    ref = sample(model, inp)
    apply_cache(model, dict(type="none"))
    try:
        assert all(torch.equal(a, b) for a, b in zip(sample(model, inp), ref))
    finally:
        remove_cache(model)


# ----------------------------------------------------------------- the reused step's math
def _forced_reference(double, inp0, inp1, force):
    """The double run uncached on ``inp1`` with, per block, the modules in ``force`` returning
    (or, for ``linear2``, reading in the columns named) what they gave on ``inp0``."""
    seen, handles = {}, []
    for kind, blocks in (("d", double.double_blocks), ("s", double.single_blocks)):
        for i, blk in enumerate(blocks):
            for name in force:
                if not hasattr(blk, name.split(".")[0]) or (kind == "s") != (name == "linear2"):
                    continue
                mod, key = blk.get_submodule(name), (kind, i, name)
                if name == "linear2":
                    handles.append(mod.register_forward_pre_hook(
                        functools.partial(_linear2_in, seen, key, force[name])))
                else:
                    handles.append(mod.register_forward_hook(
                        functools.partial(_module_out, seen, key)))
    try:
        with torch.no_grad():
            double(**inp0)
            for k in list(seen):
                seen[k] = ("replay", seen[k][1])
            return double(**inp1)
    finally:
        for h in handles:
            h.remove()


def _module_out(seen, key, module, args, out):
    if key in seen and seen[key][0] == "replay":
        return seen[key][1]
    seen[key] = ("record", out)
    return None


def _linear2_in(seen, key, cols, module, args):
    c = module.out_features
    if key in seen and seen[key][0] == "replay":
        x = args[0].clone()
        if cols == "attn":
            x[..., :c] = seen[key][1][..., :c]
        else:
            x = seen[key][1]
        return (x,)
    seen[key] = ("record", args[0])
    return None


@pytest.mark.parametrize("mlp", ["full", "partial", "reuse"])
def test_reused_attention_is_the_block_with_its_earlier_attention(mlp):
    """Step 0 computes; step 1 (other latents and timestep) reuses every attention and
    computes / recomputes all tokens of / reuses the MLPs: equal to the double with those
    outputs forced in."""
    double = build_double(3)
    model = ours(3)
    inp0 = make_inputs(small_config(), grid=(2, 3, 4), batch=2, seed=4)
    inp1 = dict(inp0, img=inp0["img"] * 0.8 + 0.1, timesteps=inp0["timesteps"] * 0.7)
    act = {"full": Action.FULL, "partial": (Action.PARTIAL, 1.0), "reuse": Action.REUSE}[mlp]
    plans = {1: plan_of(spatial_attn=Action.REUSE, temporal_attn=Action.REUSE,
                        cross_attn=Action.REUSE, mlp=act)}
    force = {"img_attn.proj": None, "txt_attn.proj": None, "linear2": "attn"}
    if mlp == "reuse":
        force.update({"img_mlp": None, "txt_mlp": None, "linear2": "all"})
    elif mlp == "partial":  # a conservative step recomputes image tokens only: text reused
        force.update({"txt_mlp": None})
    ref = _forced_reference(double, inp0, inp1, force)
    mgr = apply_cache(model, Scripted(plans))
    with mgr.session(num_steps=2, timesteps=[1.0, 0.5]), torch.no_grad():
        model(**inp0)
        got = model(**inp1)
    uncached = double(**inp1)
    assert rel(got, ref) < 1e-5, rel(got, ref)
    assert rel(got, uncached) > 1e-3  # the reuse did change the output
    counts = mgr.stats()["modules"]
    assert counts["spatial_attn"]["reuse"] == 2 * 2 + 2  # img and txt per double block
    if mlp == "partial":
        assert counts["mlp"]["partial"] == 2 + 2 and counts["mlp"]["reuse"] == 2


def test_a_computed_attention_with_reused_mlp_keeps_the_double_blocks_mlp():
    double, model = build_double(5), ours(5)
    inp0 = make_inputs(small_config(), grid=(1, 2, 5), batch=1, seed=6)
    inp1 = dict(inp0, img=-inp0["img"], timesteps=inp0["timesteps"] * 0.5)
    plans = {1: plan_of(mlp=Action.REUSE)}
    ref = _forced_reference(double, inp0, inp1, {"img_mlp": None, "txt_mlp": None})
    mgr = apply_cache(model, Scripted(plans))
    with mgr.session(num_steps=2, timesteps=[1.0, 0.5]), torch.no_grad():
        model(**inp0)
        got = model(**inp1)
    assert rel(got, ref) < 1e-5


# ----------------------------------------------------------------- every policy
POLICIES = [dict(type="DuCa", warmup_steps=1), dict(type="ToCa", warmup_steps=1),
            dict(type="DuCa", warmup_steps=1, forecast=dict(order=1)),
            dict(type="FORA", interval=2), dict(type="TrunkReuse", interval=2),
            dict(type="PAB"), dict(type="TaylorSeer"),
            dict(type="TeaCache", threshold=0.3), dict(type="FirstBlockCache", threshold=3.0),
            dict(type="DuCa", warmup_steps=1, scorer="random", stored_dtype="int8")]
# issue 19's policies and forecaster (their own tests: tests/test_cache_new_adaptive.py)
NEW_POLICIES = [dict(type="MagCache", mag_ratios=[1.0] + [0.9] * 7, threshold=1.0, max_skips=2),
                dict(type="EasyCache", threshold=0.5, warmup_steps=2),
                dict(type="SpeCa", threshold=3.0, warmup_steps=2, forecast=dict(order=1)),
                dict(type="SpeCa", threshold=3.0, warmup_steps=2, forecast=dict(method="bdf2")),
                dict(type="FORA", interval=2, forecast=dict(method="bdf2", corrector="heun")),
                dict(type="VerifiedDuCa", warmup_steps=1, verify_threshold=0.5),
                dict(type="VerifiedDuCa", warmup_steps=1, verify_threshold=0.5,
                     aggressive="modules")]


@pytest.mark.parametrize("cfg", POLICIES + NEW_POLICIES,
                         ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_every_policy_runs_on_mmdit_with_its_plan_counted(model_and_inputs, cfg):
    model, inp = model_and_inputs
    ref = sample(model, inp)
    mgr = apply_cache(model, cfg)
    try:
        got = sample(model, inp)
        stats = mgr.stats()
    finally:
        remove_cache(model)
    labels = stats["step_labels"]
    assert len(labels) == STEPS and stats["runs"] == 1
    assert set(labels) - {"full", "full (cross-attn reused)"}, labels  # it cached
    assert stats["flops_ratio"] > 1.0
    assert max(rel(a, b) for a, b in zip(got, ref)) < 5.0
    assert not all(torch.equal(a, b) for a, b in zip(got, ref))
    counts = stats["modules"]
    n_double, n_single = 2, 2
    full = sum(lab.startswith("full") for lab in labels)
    skipped = sum(lab in ("aggressive", "residual reused") for lab in labels)
    if cfg["type"] in ("DuCa", "ToCa"):
        conservative = labels.count("conservative")
        per_step = 2 * n_double + n_single  # attention features per step
        assert counts["spatial_attn"].get("full", 0) == per_step * full
        assert counts["spatial_attn"].get("reuse", 0) == per_step * conservative
        assert counts["mlp"].get("partial", 0) == (n_double + n_single) * conservative
        assert counts.get("trunk", {}).get("reuse", 0) == (n_double + n_single) * skipped


def test_flops_of_full_and_reused_steps_are_what_runs():
    """The layout's analytic FLOPs equal torch's FLOP counter on the blocks of a full step and
    of a conservative step (plus the modulation products, which the convention leaves out; the
    counter misses the fused attention kernel, whose products are counted by hand)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = ours(1)
    cfg = small_config()
    inp = make_inputs(cfg, grid=(2, 4, 4), batch=2, seed=2)
    plans = {1: plan_of(spatial_attn=Action.REUSE, temporal_attn=Action.REUSE,
                        cross_attn=Action.REUSE, mlp=(Action.PARTIAL, 0.25))}
    mgr = apply_cache(model, Scripted(plans))
    layout = mgr.layout
    measured = []
    with mgr.session(num_steps=2, timesteps=[1.0, 0.5]), torch.no_grad():
        for t in (1.0, 0.5):
            with FlopCounterMode(display=False) as counter:
                model(**dict(inp, timesteps=torch.full((2,), t)))
            by_module = counter.get_flop_counts()
            measured.append(sum(sum(by_module.get(f"{type(model).__name__}.{name}", {})
                                    .values()) for name, _, _ in layout.blocks(model)))
    c, b = cfg.hidden_size, 2
    modulation = b * (2 * 2 * c * 6 * c * 2 + 2 * 2 * c * 3 * c)  # 2 double, 2 single blocks
    # torch's counter does not see the CPU's fused attention kernel: its products by hand
    n, L = 2 * 4 * 4, inp["txt"].shape[1]
    attention = 4 * b * 4 * (n + L) ** 2 * c
    analytic = mgr.counts.step_flops
    assert measured[0] == pytest.approx(analytic[0] - attention + modulation, rel=1e-9)
    assert measured[1] == pytest.approx(analytic[1] + modulation, rel=1e-9)
    assert analytic[1] < 0.2 * analytic[0]


# ----------------------------------------------------------------- the three-branch batch
def three_branch(rows_of):
    """Upstream's I2V batch for clips ``rows_of``: img [x..., x..., x...], text [p..., neg...,
    neg...], cond [c..., c..., 0...]."""
    cfg = small_config()
    inp = make_inputs(cfg, grid=(2, 3, 4), batch=3, seed=8)
    neg = make_inputs(cfg, grid=(2, 3, 4), batch=1, seed=9)
    pick = list(rows_of)
    x, txt, y, cond = inp["img"][pick], inp["txt"][pick], inp["y_vec"][pick], inp["cond"][pick]
    n = len(pick)
    return dict(img=x.repeat(3, 1, 1), img_ids=inp["img_ids"][:1].repeat(3 * n, 1, 1),
                txt=torch.cat([txt, neg["txt"].repeat(2 * n, 1, 1)]),
                txt_ids=torch.zeros(3 * n, txt.shape[1], 3),
                y_vec=torch.cat([y, neg["y_vec"].repeat(2 * n, 1)]),
                cond=torch.cat([cond, cond, torch.zeros_like(cond)]))


@torch.no_grad()
def guided(model, inp, steps=STEPS):
    """Upstream's I2VDenoiser loop shape: one call on the three-branch batch per step, the
    guided velocity applied to every branch's copy."""
    n = inp["img"].shape[0] // 3
    img = inp["img"].clone()
    ts = [1 - i / steps for i in range(steps + 1)]
    for t, t_next in zip(ts[:-1], ts[1:]):
        img = torch.cat([img[:n]] * 3)
        pred = model(**dict(inp, img=img, timesteps=torch.full((3 * n,), t)))
        c, u, u2 = pred.chunk(3)
        v = u2 + 2.0 * (u - u2) + 4.0 * (c - u)
        img = img + (t_next - t) * 0.3 * torch.cat([v, v, v])
    return img[:n]


@pytest.mark.parametrize("cfg", [dict(type="TeaCache", threshold=1.2),
                                 dict(type="DuCa", warmup_steps=1)])
def test_a_clip_decides_alone_in_the_three_branch_batch(cfg):
    model = ours(2)
    outs, labels = {}, {}
    for rows in ((0,), (0, 1)):
        mgr = apply_cache(model, cfg)
        outs[rows] = guided(model, three_branch(rows))
        labels[rows] = mgr.stats()
        remove_cache(model)
    assert labels[(0, 1)]["runs"] == 1
    if cfg["type"] == "TeaCache":
        assert labels[(0, 1)]["groups"] == [[0, 2, 4], [1, 3, 5]]
        alone = [g[0] for g in labels[(0,)]["group_labels"]]
        beside = [g[0] for g in labels[(0, 1)]["group_labels"]]
        assert alone == beside and "residual reused" in alone
    assert rel(outs[(0, 1)][:1], outs[(0,)]) < 1e-5


# ----------------------------------------------------------------- upstream's booster
def _sp_world_of_one():
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1)


@pytest.mark.parametrize("order", ["cache_then_booster", "booster_then_cache"])
def test_the_cache_survives_upstreams_booster(order):
    """The booster swaps every block's processor and replaces the model's forward (a partial
    of a module-level function); either before or after the cache is attached the cached run
    equals the cached run of the plain double (one rank)."""
    _sp_world_of_one()
    cfg = dict(type="DuCa", warmup_steps=1)
    inp = make_inputs(small_config(), grid=(2, 3, 4), batch=2, seed=12)
    plain = build_double(7)
    apply_cache(plain, cfg)
    ref = sample(plain, inp)
    boosted = build_double(7)
    if order == "cache_then_booster":
        mgr = apply_cache(boosted, cfg)
        shard_mmdit(boosted)
    else:
        shard_mmdit(boosted)
        mgr = apply_cache(boosted, cfg)
    got = sample(boosted, inp)
    assert "conservative" in mgr.stats()["step_labels"]
    assert max(rel(a, b) for a, b in zip(got, ref)) < 1e-5


def test_sessionless_upstream_loop_is_one_run(model_and_inputs):
    model, inp = model_and_inputs
    apply_cache(model, dict(type="DuCa", warmup_steps=1))
    try:
        sample(model, inp, session=False)
        stats = get_cache_manager(model).stats()
    finally:
        remove_cache(model)
    assert stats["runs"] == 1 and "aggressive" in stats["step_labels"]


def test_token_picking_under_upstreams_even_split_is_refused():
    """Upstream's booster cuts latent rows across ranks: policies that pick tokens or decide
    per latent row are refused there (one line), fixed plans are accepted."""
    from opensora_duca.cache.layouts.mmdit import MMDiTLayout

    _sp_world_of_one()
    boosted = shard_mmdit(build_double(1))
    with pytest.raises(ValueError, match="'DuCa' picks tokens.*even chunks"):
        MMDiTLayout.check_group(boosted, 2, True, False, "DuCa")
    with pytest.raises(ValueError, match="'TeaCache' decides from changes"):
        MMDiTLayout.check_group(boosted, 2, False, True, "TeaCache")
    MMDiTLayout.check_group(boosted, 2, False, False, "FORA")
    MMDiTLayout.check_group(build_double(1), 2, True, False, "DuCa")  # not upstream's SP
    MMDiTLayout.check_group(boosted, 1, True, False, "DuCa")  # one rank


# ----------------------------------------------------------------- sequence parallelism
SP_POLICIES = {"none": dict(type="none"), "duca": dict(type="DuCa", warmup_steps=1),
               "teacache": dict(type="TeaCache", threshold=1.2),
               "magcache": NEW_POLICIES[0], "easycache": dict(NEW_POLICIES[1], threshold=2.0),
               "speca": NEW_POLICIES[2], "verifiedduca": NEW_POLICIES[5],
               "verifiedduca-modules": NEW_POLICIES[6]}


def _sp_runs(rank, world_size, sp: bool = True):
    """Each policy's sampled latents on this project's MMDiT (sharded when ``sp``), the step
    labels, and the collectives issued at each step."""
    from dist_utils import observe_collectives

    double = build_double(9)
    model = MMDiTModel(MMDiTConfig(**vars(double.config)), enable_sequence_parallelism=sp)
    model.load_state_dict(double.state_dict())
    model.eval()
    inp = make_inputs(small_config(), grid=(2, 3, 4), txt_len=5, batch=2, seed=13)
    out = {}
    for name, cfg in SP_POLICIES.items():
        mgr = apply_cache(model, cfg)
        calls = []
        with observe_collectives(lambda op, kw: calls.append(op)):
            got = sample(model, inp)
        stats = mgr.stats()
        out[name] = [torch.stack(got), stats["step_labels"], len(calls), stats["group_labels"]]
        remove_cache(model)
    return out


@pytest.fixture(scope="module")
def single_process_runs():
    return _sp_runs(0, 1, sp=False)


@pytest.mark.parametrize("world_size", [2, 4])
def test_two_and_four_ranks_give_the_single_process_run(single_process_runs, world_size):
    """Uncached, DuCa, TeaCache, MagCache, EasyCache, SpeCa and VerifiedDuCa under sequence
    parallelism (4
    ranks: more ranks than the grid's 3 latent rows, padding rows) take the single process's
    decisions, per clip too, and give its latents (float rounding); cached steps issue fewer
    collectives than computed ones (a reused module issues none)."""
    from dist_utils import run_distributed

    single = single_process_runs
    ranks = run_distributed(_sp_runs, world_size)
    for name in SP_POLICIES:
        if name in ("magcache", "easycache", "speca"):  # they did skip (per clip)
            labels = {lab for step in single[name][3] for lab in step}
            assert labels & {"residual reused", "forecast (verified)"}, (name, labels)
        if name.startswith("verifiedduca"):  # some clips fell back where others forecast
            labels = {lab for step in single[name][3] for lab in step}
            assert {"aggressive", "full (forecast rejected)"} <= labels, labels
        for r in ranks:
            assert r[name][1] == single[name][1], name  # the same plan on every rank
            assert r[name][3] == single[name][3], name  # and per clip
            assert rel(r[name][0], single[name][0]) < 1e-5, (name, rel(r[name][0],
                                                                      single[name][0]))
    assert ranks[0]["duca"][2] < ranks[0]["none"][2]
    assert ranks[0]["teacache"][2] < ranks[0]["none"][2]


def _booster_runs(rank, world_size):
    """The double sharded as upstream's booster does (even chunks of the joint sequence): FORA's
    and TrunkReuse's runs, and DuCa's refusal."""
    double = build_double(7)
    shard_mmdit(double)
    inp = make_inputs(small_config(), grid=(2, 3, 4), txt_len=4, batch=2, seed=12)
    out = {}
    for cfg in (dict(type="FORA", interval=2), dict(type="TrunkReuse", interval=2)):
        mgr = apply_cache(double, cfg)
        out[cfg["type"]] = [torch.stack(sample(double, inp)), mgr.stats()["step_labels"]]
        remove_cache(double)
    apply_cache(double, dict(type="DuCa", warmup_steps=1))
    try:
        sample(double, inp)
        out["refusal"] = None
    except ValueError as err:
        out["refusal"] = str(err)
    return out


def test_fixed_plans_run_under_upstreams_sequence_parallelism():
    """Two ranks of upstream's booster (processors swapped, forward replaced, the joint
    sequence split evenly): FORA and TrunkReuse give the single process's run; DuCa (token
    subsets per latent row) is refused with one line at the first step."""
    from dist_utils import run_distributed

    inp = make_inputs(small_config(), grid=(2, 3, 4), txt_len=4, batch=2, seed=12)
    plain = build_double(7)
    ranks = run_distributed(_booster_runs, 2)
    for name, cfg in (("FORA", dict(type="FORA", interval=2)),
                      ("TrunkReuse", dict(type="TrunkReuse", interval=2))):
        mgr = apply_cache(plain, cfg)
        ref = torch.stack(sample(plain, inp))
        labels = mgr.stats()["step_labels"]
        remove_cache(plain)
        for r in ranks:
            assert r[name][1] == labels and rel(r[name][0], ref) < 1e-5, name
    assert all("even chunks" in r["refusal"] and "\n" not in r["refusal"] for r in ranks)
