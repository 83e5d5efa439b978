"""The MMDiT under Ulysses sequence parallelism (gloo, 1, 2 and 4 CPU ranks) gives the
single-process output; the image tokens a rank holds are whole latent rows of every frame.
Also: the upstream-shaped double sharded as upstream's booster does (tests/upstream_mmdit.py,
``shard_mmdit``) gives its own single-process output."""
from __future__ import annotations

import pytest
import torch
import upstream_mmdit as up
from dist_utils import observe_collectives, run_distributed

TOL64 = 1e-10  # float64 runs
TOL32 = 2e-5   # the double (float32)

MODELS = {
    "published": dict(fused_qkv=False, use_liger_rope=True, cond_embed=True),
    "fused_interleaved_guidance": dict(fused_qkv=True, use_liger_rope=False, cond_embed=False,
                                       guidance_embed=True),
}
# (model, grid (T, H, W), text length)
CASES = {
    "even": ("published", (2, 4, 3), 4),
    "pad_rows_odd_text": ("published", (2, 3, 5), 5),  # H=3, Lt=5: padded for 2 and 4 ranks
    "fewer_rows_than_ranks": ("fused_interleaved_guidance", (3, 2, 3), 3),
    "one_frame": ("fused_interleaved_guidance", (1, 5, 2), 7),
}
DOUBLE_CASE = ("published", (2, 3, 4), 4)  # 28 tokens: upstream needs Lt + L divisible by P


def make_ours(name: str, sp: bool = False):
    from opensora_duca.models.mmdit import MMDiTConfig, MMDiTModel
    double = up.build_double(seed=21, **MODELS[name])
    cfg = {k: v for k, v in vars(double.config).items()}
    model = MMDiTModel(MMDiTConfig(**cfg), enable_sequence_parallelism=sp)
    model.load_state_dict(double.state_dict())
    return model.double().eval()


def inputs_for(case: str, dtype=torch.float64):
    name, grid, txt_len = CASES[case]
    return up.make_inputs(up.small_config(**MODELS[name]), grid=grid, txt_len=txt_len, seed=3,
                          dtype=dtype)


def run_ours(sp: bool):
    """{case: output}, {case: image input of the first double block}, {case: plan facts}."""
    out, first_img, plans = {}, {}, {}
    models = {name: make_ours(name, sp) for name in MODELS}
    for case, (name, _, _) in CASES.items():
        model = models[name]
        seen = {}

        def hook(block, args, seen=seen, model=model):
            seen["img"], seen["txt"] = args[0].clone(), args[1].clone()
            plan = model.sp_state.plan
            if plan is not None:
                seen["plan"] = dict(rows=plan.rows, txt_chunk=plan.txt_chunk,
                                    local_img_index=plan.local_img_index.clone(),
                                    local_txt_index=plan.local_txt_index.clone())
        handle = model.double_blocks[0].register_forward_pre_hook(hook)
        with torch.no_grad():
            out[case] = model(**inputs_for(case))
        handle.remove()
        first_img[case] = seen["img"]
        plans[case] = dict(seen.get("plan", {}), txt_local=seen["txt"].shape[1],
                           plan_after=model.sp_state.plan is not None)
    return out, first_img, plans


def run_double():
    name, grid, txt_len = DOUBLE_CASE
    double = up.build_double(seed=21, **MODELS[name])
    inputs = up.make_inputs(double.config, grid=grid, txt_len=txt_len, seed=4)
    return double, inputs


def sp_worker(rank, world_size):
    import opensora_duca.parallel as sp
    calls = []
    with observe_collectives(lambda name, kw: calls.append(name)):
        out, first_img, plans = run_ours(sp=True)
    model = make_ours("published", sp=True)
    group_is_set = model.sequence_parallel_group() is not None
    # the grid may be given instead of read from img_ids; a wrong one is an error under SP
    _, grid, _ = CASES["pad_rows_odd_text"]
    with torch.no_grad():
        out["grid_size"] = model(**inputs_for("pad_rows_odd_text"), grid_size=grid)
        try:
            model(**inputs_for("pad_rows_odd_text"), grid_size=(1, 1, 1))
            out["bad_grid"] = None
        except ValueError as err:
            out["bad_grid"] = str(err)
    double, inputs = run_double()
    up.shard_mmdit(double)
    with torch.no_grad():
        out["double"] = double(**inputs)
    sp.reset_sequence_parallel_group()
    return dict(out=out, first_img=first_img, plans=plans, group_is_set=group_is_set,
                all_to_all=calls.count("all_to_all_single"), bad_heads=bad_heads_message())


@pytest.fixture(scope="module")
def single():
    out, first_img, plans = run_ours(sp=False)
    double, inputs = run_double()
    with torch.no_grad():
        out["double"] = double(**inputs)
    return out, first_img, plans


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sequence_parallel_matches_single_process(single, world_size):
    want, want_img, _ = single
    for rank, res in enumerate(run_distributed(sp_worker, world_size)):
        assert res["group_is_set"] == (world_size > 1)
        if world_size > 1:
            assert res["all_to_all"] > 0, "sequence parallelism was not active"
            msg = res["bad_heads"]
            assert msg is not None and "num_heads=3" in msg and f"group size {world_size}" in msg
        else:
            assert res["all_to_all"] == 0 and res["bad_heads"] is None
        for case in CASES:
            got = res["out"][case]
            assert got.shape == want[case].shape, case
            diff = (got - want[case]).abs().max().item()
            assert diff <= TOL64 * max(1.0, want[case].abs().max().item()), \
                f"{case}: rank {rank}/{world_size} differs by {diff}"
        diff = (res["out"]["grid_size"] - want["pad_rows_odd_text"]).abs().max().item()
        assert diff <= TOL64 * max(1.0, want["pad_rows_odd_text"].abs().max().item())
        if world_size > 1:
            assert "grid_size=(1, 1, 1)" in res["out"]["bad_grid"]
        diff = (res["out"]["double"] - want["double"]).abs().max().item()
        assert diff <= TOL32 * max(1.0, want["double"].abs().max().item()), \
            f"sharded double: rank {rank}/{world_size} differs by {diff}"

        for case, (_, (t, h, w), txt_len) in CASES.items():
            plan = res["plans"][case]
            assert not plan["plan_after"], "the model kept its plan after the forward"
            if world_size == 1:
                assert "rows" not in plan and plan["txt_local"] == txt_len
                continue
            hl = -(-h // world_size)
            ct = -(-txt_len // world_size)
            assert plan["rows"] == hl and plan["txt_chunk"] == ct == plan["txt_local"]
            # this rank's image tokens: rows [rank*hl, (rank+1)*hl) of every frame, zero pad
            full = want_img[case]
            b, _, c = full.shape
            grid = torch.nn.functional.pad(full.view(b, t, h, w, c),
                                           (0, 0, 0, 0, 0, hl * world_size - h))
            rows = grid[:, :, rank * hl:(rank + 1) * hl].reshape(b, t * hl * w, c)
            local = res["first_img"][case]
            assert local.shape == rows.shape
            diff = (local - rows).abs().max().item()
            assert diff <= TOL64 * max(1.0, full.abs().max().item()), f"{case}: rows differ"
            idx = plan["local_img_index"]
            ids = torch.arange(t * h * w).view(t, h, w)
            ids = torch.nn.functional.pad(ids, (0, 0, 0, hl * world_size - h), value=-1)
            assert torch.equal(idx, ids[:, rank * hl:(rank + 1) * hl].reshape(-1))
            txt_idx = torch.arange(rank * ct, (rank + 1) * ct)
            txt_idx[txt_idx >= txt_len] = -1
            assert torch.equal(plan["local_txt_index"], txt_idx)


def bad_heads_message():
    """The error of a model whose 3 heads the group cannot split (None: no error)."""
    from opensora_duca.models.mmdit import MMDiTConfig, MMDiTModel
    cfg = up.small_config(hidden_size=24, num_heads=3, axes_dim=[2, 2, 4])
    model = MMDiTModel(MMDiTConfig(**vars(cfg)), enable_sequence_parallelism=True)
    try:
        with torch.no_grad():
            model(**up.make_inputs(cfg))
    except ValueError as err:
        return str(err)
    return None
