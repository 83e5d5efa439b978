"""VBench end to end: every dimension whose code can run here, on stand-in weights built at test
time (tests/vbench_standins.py), through tools/vbench_evaluate.py's main; the Total / Quality /
Semantic aggregation against a hand-computed example; the weight-file listing and the checks made
before any work; the paper table (VBench, fidelity against the uncached run, speedup, FLOPs
ratio) from tools/vbench_generate.py runs of the demo model, sharded and resumed."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import vbench_standins as st

from opensora_duca.eval import vbench as vb
from opensora_duca.eval import vbench_table as vt
from opensora_duca.utils.video import save_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo", "inference.py")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vbench") is None, reason="vbench not installed"
)

# What the project's setup installs (requirements-vbench.txt, the Makefile): these 12 must run
# here. GRiT (object_class, multiple_objects, color, spatial_relationship) needs detectron2, which
# cannot be installed here.
RUNNABLE = {
    "subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
    "dynamic_degree", "aesthetic_quality", "imaging_quality", "human_action", "temporal_style",
    "appearance_style", "overall_consistency", "scene",
}

# VBench's published normalisation (the reference facts), written out independently of the code.
MIN_MAX = {
    "subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975),
    "scene": (0.0, 0.8222), "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364), "overall_consistency": (0.0, 0.364),
}
QUALITY = ["subject_consistency", "background_consistency", "temporal_flickering",
           "motion_smoothness", "dynamic_degree", "aesthetic_quality", "imaging_quality"]


def _reference_scores(raw):
    """Quality / Semantic / Total (percent) over the dimensions in ``raw``, straight from the
    recipe: (x - min) / (max - min) * weight; Quality = sum / sum of weights, Semantic = mean."""
    norm = {}
    for d, x in raw.items():
        lo, hi = MIN_MAX.get(d, (0.0, 1.0))
        norm[d] = (x - lo) / (hi - lo) * (0.5 if d == "dynamic_degree" else 1.0)
    q = [d for d in raw if d in QUALITY]
    s = [d for d in raw if d not in QUALITY]
    quality = sum(norm[d] for d in q) / sum(0.5 if d == "dynamic_degree" else 1.0 for d in q)
    semantic = sum(norm[d] for d in s) / len(s)
    return 100 * quality, 100 * semantic, 100 * (4 * quality + semantic) / 5


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("vbench_standins")
    cache, home = str(root / "vbench_cache"), str(root / "torch_home")
    hf = str(root / "hf_hub")
    names = ("TORCH_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE",
             "TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE", "PYTORCH_TRANSFORMERS_CACHE",
             "PYTORCH_PRETRAINED_BERT_CACHE")
    old = {k: os.environ.get(k) for k in names}
    os.environ["TORCH_HOME"] = home  # the DINO hubconf reads its weights from torch.hub's cache
    try:  # (build_standins points the Hugging Face libraries at hf, offline)
        files = st.build_standins(cache, home, scale="tiny", hf_cache=hf)
        yield {"cache": cache, "home": home, "hf": hf, "files": files}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _suite_videos(folder, frames=8, size=(64, 96)):
    """One short video {prompt}-0.mp4 for the first prompt of each group of dimensions of the
    suite (11 groups cover the 16 dimensions): a textured frame sliding right."""
    groups = {}
    for e in vb.load_full_info():
        groups.setdefault(tuple(sorted(e["dimension"])), e["prompt_en"])
    rng = np.random.default_rng(0)
    for prompt in groups.values():
        base = rng.integers(0, 256, size=size + (3,)).astype(np.uint8)
        clip = np.stack([np.roll(base, 3 * t, axis=1) for t in range(frames)])
        save_video(clip, os.path.join(folder, vb.video_filename(prompt, 0)), fps=8)
    return groups


def _scored(text):
    """The dimensions this command scored (its 'scored DIM of FOLDER' lines)."""
    return [ln.split()[1] for ln in text.splitlines() if ln.startswith("scored ")]


def _err_lines(capsys):
    return capsys.readouterr().err.strip().splitlines()


# --------------------------------------------------------------------------------- all dimensions
def test_all_dimensions_end_to_end(standins, tmp_path, capsys):
    from opensora_duca.cli import vbench_evaluate as cli

    vids = tmp_path / "videos"
    groups = _suite_videos(str(vids))
    out_dir, summary = tmp_path / "results", tmp_path / "summary.json"
    argv = [str(vids), "--weights-dir", standins["cache"], "--dimensions", "all",
            "--output-dir", str(out_dir), "--json", str(summary)]
    with st.tiny_fixed_architectures(standins["cache"]):
        rc = cli.main(argv)
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    res = json.loads(summary.read_text())
    scored, skipped = set(res["dimensions"]), set(res["skipped_unavailable"])
    assert res["failed"] == {} and res["pending"] == [] and res["skipped_missing_weights"] == {}
    assert RUNNABLE <= scored and scored | skipped == set(vb.ALL_DIMENSIONS)
    assert not scored & skipped
    for d in skipped:  # each one says, in one line, which package it lacks
        assert f"skipped {d}: cannot run here: needs the python package(s)" in text
    for d in scored:
        r = res["dimensions"][d]
        assert r["num_videos"] >= 1 and math.isfinite(r["raw"]), d
        # VBench's own result file, and the per-video list it holds
        own = json.loads((out_dir / f"opensora_duca_{d}_eval_results.json").read_text())[d]
        assert own[0] == pytest.approx(r["raw"]) and len(own[1]) == r["num_videos"]
        # the video it scored is the one of its prompt group
        assert any(d in g for g in groups)
    # the project's aggregation over what was scored, against the recipe written out above
    q, s, t = _reference_scores({d: v["raw"] for d, v in res["dimensions"].items()})
    assert res["summary"]["quality"] == pytest.approx(q)
    assert res["summary"]["semantic"] == pytest.approx(s)
    assert res["summary"]["total"] == pytest.approx(t)
    assert res["summary"]["quality_complete"] and not res["summary"]["complete"]
    assert f"Total: {t:.2f} % (partial or not available)" in text

    # the same command again: every score is reused (nothing scored), same numbers
    with st.tiny_fixed_architectures(standins["cache"]):
        assert cli.main(argv) == 0
    text2 = capsys.readouterr().out
    assert _scored(text2) == []
    res2 = json.loads(summary.read_text())
    assert res2["dimensions"] == res["dimensions"] and sorted(res2["resumed"]) == sorted(scored)

    # a new video invalidates the stored scores of that folder: scored again
    save_video(np.zeros((8, 64, 64, 3), np.uint8), str(vids / "extra clip-0.mp4"))
    with st.tiny_fixed_architectures(standins["cache"]):
        assert cli.main(argv[:4] + ["temporal_flickering"] + argv[5:]) == 0
    assert _scored(capsys.readouterr().out) == ["temporal_flickering"]


# --------------------------------------------------------------------------------- aggregation
def test_aggregation_hand_computed_example():
    raw = dict(subject_consistency=0.96, background_consistency=0.97, temporal_flickering=0.99,
               motion_smoothness=0.98, dynamic_degree=0.40, aesthetic_quality=0.55,
               imaging_quality=0.60, object_class=0.80, multiple_objects=0.50,
               human_action=0.90, color=0.85, spatial_relationship=0.60, scene=0.40,
               temporal_style=0.24, appearance_style=0.22, overall_consistency=0.26)
    # by hand: (x - min) / (max - min), the differences worked out
    norm = {
        "subject_consistency": 0.8138 / 0.8538,  # (0.96 - 0.1462) / (1 - 0.1462)
        "background_consistency": 0.7085 / 0.7385,  # (0.97 - 0.2615) / (1 - 0.2615)
        "temporal_flickering": 0.3607 / 0.3707,  # (0.99 - 0.6293) / (1 - 0.6293)
        "motion_smoothness": 0.274 / 0.2915,  # (0.98 - 0.706) / (0.9975 - 0.706)
        "dynamic_degree": 0.2,  # 0.40 * weight 0.5
        "aesthetic_quality": 0.55, "imaging_quality": 0.60,
        "object_class": 0.80, "multiple_objects": 0.50, "human_action": 0.90, "color": 0.85,
        "spatial_relationship": 0.60,
        "scene": 0.40 / 0.8222,
        "temporal_style": 0.24 / 0.364,
        "appearance_style": 0.2191 / 0.2846,  # (0.22 - 0.0009) / (0.2855 - 0.0009)
        "overall_consistency": 0.26 / 0.364,
    }
    quality = (0.953150621 + 0.959377116 + 0.973024009 + 0.939965695 + 0.2 + 0.55 + 0.6) / 6.5
    semantic = (0.8 + 0.5 + 0.9 + 0.85 + 0.6 + 0.486499635 + 0.659340659 + 0.769852425
                + 0.714285714) / 9
    s = vb.final_scores(raw)
    for d, v in norm.items():
        assert s["normalized"][d] == pytest.approx(100 * v), d
    assert quality == pytest.approx(0.7962335, abs=1e-7)
    assert semantic == pytest.approx(0.6977754, abs=1e-7)
    assert s["quality"] == pytest.approx(79.62335, abs=1e-4)
    assert s["semantic"] == pytest.approx(69.77754, abs=1e-4)
    assert s["total"] == pytest.approx(100 * (4 * quality + semantic) / 5, abs=1e-4)
    assert s["total"] == pytest.approx(77.65418, abs=1e-4)
    assert s["complete"] and s["notes"] == []


# --------------------------------------------------------------------------------- weights, checks
def test_weight_listing_and_checks_before_work(standins, tmp_path, capsys, monkeypatch):
    from opensora_duca.cli import vbench_evaluate as cli

    empty, home = tmp_path / "empty", tmp_path / "home"
    empty.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "hf"))
    assert cli.main(["--weights-dir", str(empty), "--list-weights"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    listed = {}
    for line in lines:
        if line.endswith("(MISSING)") or line.endswith("(present)"):
            d, rest = line.split(": ", 1)
            listed.setdefault(d, []).append(rest.rsplit(" (", 1))
    assert set(listed) == set(vb.ALL_DIMENSIONS) - {"temporal_flickering"}
    assert "temporal_flickering: no weight file" in lines
    assert all(state == "MISSING)" for v in listed.values() for _, state in v)
    # the exact expected paths
    paths = {p for v in listed.values() for p, _ in v}
    for rel in ("clip_model/ViT-B-32.pt", "clip_model/ViT-L-14.pt",
                "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
                "dino_model/facebookresearch_dino_main/hubconf.py",
                "dino_model/dino_vitbase16_pretrain.pth", "amt_model/amt-s.pth",
                "raft_model/models/raft-things.pth", "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
                "grit_model/grit_b_densecap_objectdet.pth", "caption_model/tag2text_swin_14m.pth",
                "umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",
                "ViCLIP/ViClip-InternVid-10M-FLT.pth", "ViCLIP/bpe_simple_vocab_16e6.txt.gz"):
        assert str(empty / rel) in paths, rel
    assert str(home / "hub" / "checkpoints" / "dino_vitbase16_pretrain.pth") in paths
    snap = tmp_path / "hf" / "models--bert-base-uncased" / "snapshots" / "<revision>"
    assert str(snap / "vocab.txt") in paths
    assert str(snap / "model.safetensors|pytorch_model.bin") in paths

    # the stand-in folder has every file the runnable dimensions need
    monkeypatch.setenv("TORCH_HOME", standins["home"])
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", standins["hf"])
    assert cli.main(["--weights-dir", standins["cache"], "--list-weights", "--dimensions",
                     *sorted(RUNNABLE)]) == 0
    out = capsys.readouterr().out
    assert "(MISSING)" not in out and out.count("(present)") == 16 + 4  # 4: bert-base-uncased

    # missing weights: one line naming every missing file, exit 2, nothing written
    vids = tmp_path / "v"
    save_video(np.zeros((4, 64, 64, 3), np.uint8), str(vids / "a calm lake-0.mp4"))
    res_dir = tmp_path / "out"
    rc = cli.main([str(vids), "--weights-dir", str(empty), "--dimensions", "dynamic_degree",
                   "appearance_style", "--output-dir", str(res_dir)])
    err = _err_lines(capsys)
    assert rc == 2 and len(err) == 1
    assert str(empty / "raft_model/models/raft-things.pth") in err[0]
    assert str(empty / "clip_model/ViT-B-32.pt") in err[0]
    assert not res_dir.exists()

    # videos too small for RAFT: one line, exit 2, unless upscaled copies are asked for
    small = tmp_path / "small"
    save_video(np.zeros((4, 32, 32, 3), np.uint8), str(small / "a calm lake-0.mp4"))
    rc = cli.main([str(small), "--weights-dir", standins["cache"], "--dimensions",
                   "dynamic_degree", "--output-dir", str(res_dir)])
    err = _err_lines(capsys)
    assert rc == 2 and len(err) == 1 and "--upscale-to 64" in err[0] and "32x32" in err[0]
    assert not res_dir.exists()

    # a dimension named explicitly that cannot run here: one line, exit 2
    if importlib.util.find_spec("detectron2") is None:
        rc = cli.main([str(vids), "--weights-dir", standins["cache"], "--dimensions",
                       "object_class", "--output-dir", str(res_dir)])
        err = _err_lines(capsys)
        assert rc == 2 and len(err) == 1 and "detectron2" in err[0]
        assert not res_dir.exists()


def test_bad_input_one_line_exit_2(tmp_path, capsys):
    from opensora_duca.cli import vbench_evaluate as cli

    vids = tmp_path / "v"
    vids.mkdir()
    w = tmp_path / "w"
    w.mkdir()
    base = [str(vids), "--weights-dir", str(w)]
    cases = [
        (base + ["--dimensions", "sharpness"], "sharpness"),
        (base + ["--dimensions", "all", "scene"], "'all'"),
        ([str(tmp_path / "nope"), "--weights-dir", str(w)], "does not exist"),
        ([str(vids), "--weights-dir", str(tmp_path / "nope")], "--weights-dir"),
        (base + ["--lpips"], "--reference"),
        (base + ["--rank", "2", "--world-size", "2", "--dimensions", "temporal_flickering"],
         "--rank"),
        (base + ["--upscale-to", "0"], "--upscale-to"),
        (["--weights-dir", str(w)], "VIDEO_DIR"),
        ([str(vids), str(tmp_path / "x" / "v"), "--weights-dir", str(w),
          "--dimensions", "temporal_flickering"], "distinct names"),
    ]
    (tmp_path / "x" / "v").mkdir(parents=True)
    for argv, word in cases:
        assert cli.main(argv) == 2, argv
        err = _err_lines(capsys)
        assert len(err) == 1 and word in err[0], (argv, err)
    assert sorted(os.listdir(tmp_path)) == ["v", "w", "x"]  # nothing written anywhere


# --------------------------------------------------------------------------------- paper table
def test_table_rows_and_markdown():
    summary = vb.final_scores({"temporal_flickering": 0.9, "scene": 0.4111})
    ref_costs = {"videos": 2, "seconds": 8.0, "flops_uncached": None, "flops_actual": None,
                 "labels": ["uncached"]}
    run_costs = {"videos": 2, "seconds": 5.0, "flops_uncached": 30.0, "flops_actual": 12.0,
                 "labels": ["DuCa"]}
    fid = {"aggregate": {"psnr": 31.5, "ssim": 0.91234, "lpips": None}, "num_compared": 2}
    ref = vt.table_row("uncached", summary, None, ref_costs, ref_costs, True)
    row = vt.table_row("DuCa", summary, fid, run_costs, ref_costs, False)
    assert ref["speedup"] == 1.0 and ref["flops_ratio"] == 1.0 and ref["psnr"] is None
    assert row["speedup"] == pytest.approx(1.6) and row["flops_ratio"] == pytest.approx(2.5)
    assert row["psnr"] == 31.5 and row["ssim"] == 0.91234 and row["compared_videos"] == 2
    md = vt.markdown_table([ref, row]).splitlines()
    t = summary["total"]  # 100 * (4 * 0.73024 + 0.5) / 5 over 2 dimensions: flagged partial
    assert md[2] == f"| uncached (reference) | {t:.2f}* | {summary['quality']:.2f}* | 50.00* " \
                    f"| - | - | - | 1.00x | 1.00x |"
    assert md[3] == f"| DuCa | {t:.2f}* | {summary['quality']:.2f}* | 50.00* | 31.50 | 0.9123 " \
                    f"| n/a | 1.60x | 2.50x |"
    assert "over 2 of the 16 VBench dimensions" in md[-1]
    # costs summed only over the given videos; a record without FLOPs makes the sum unknown
    costs = {"a.mp4": {"seconds": 1.0, "flops_uncached": 4.0, "flops_actual": 2.0, "label": "x"},
             "b.mp4": {"seconds": 3.0, "flops_uncached": 4.0, "flops_actual": 1.0, "label": "x"},
             "c.mp4": {"seconds": 9.0, "flops_uncached": None, "flops_actual": None}}
    c = vt.cost_summary(costs, ["a.mp4", "b.mp4"])
    assert (c["videos"], c["seconds"], c["flops_uncached"], c["flops_actual"]) == (2, 4.0, 8.0,
                                                                                   3.0)
    assert vt.cost_summary(costs, ["a.mp4", "c.mp4"])["flops_actual"] is None


def test_paper_table_demo_model_sharded_and_resumed(standins, tmp_path, capsys):
    import torch

    from opensora_duca.cli import vbench_evaluate as cli
    from opensora_duca.cli import vbench_generate as vg
    from opensora_duca.eval import fidelity

    torch.set_num_threads(1)
    root = tmp_path / "runs"
    # the demo model knows only its own words: VBench's custom_input mode (prompt = file name)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    common = ["--prompt-path", str(prompts), "--num-samples", "1", "--device", "cpu",
              "--no-progress"]
    for name, cache in (("uncached", "cache=None"), ("duca", "cache.type=DuCa")):
        assert vg.main([DEMO, "--save-dir", str(root / name), *common, "--cfg-options",
                        "scheduler.num_sampling_steps=6", cache]) == 0
    capsys.readouterr()
    dims = ["temporal_flickering", "dynamic_degree"]
    argv = [str(root / "duca"), "--reference", str(root / "uncached"), "--weights-dir",
            standins["cache"], "--dimensions", *dims, "--upscale-to", "64", "--mode",
            "custom_input",
            "--output-dir", str(tmp_path / "results")]
    # two ranks' shares, one after the other; rank 0 assembles once rank 1's share is done
    assert cli.main(argv + ["--rank", "1", "--world-size", "2"]) == 0
    out1 = capsys.readouterr().out
    assert "rank 1/2: share done (2 pair(s))" in out1
    assert cli.main(argv + ["--rank", "0", "--world-size", "2", "--wait-s", "0"]) == 0
    out0 = capsys.readouterr().out
    assert len(_scored(out0)) == 2  # rank 0 scored its 2 of the 4 (folder, dimension) pairs
    table = (tmp_path / "results" / "paper_table.md").read_text()
    data = json.loads((tmp_path / "results" / "vbench_summary.json").read_text())
    rows = {r["label"]: r for r in data["paper_table"]["rows"]}
    assert set(rows) == {"uncached", "DuCa"} and "| DuCa |" in table
    ref, duca = rows["uncached"], rows["DuCa"]
    assert ref["reference"] and ref["speedup"] == 1.0 and ref["flops_ratio"] == 1.0

    # independent reads of the generation records and of the fidelity
    def meta(run):
        folder = root / run / "_meta"
        return [json.loads((folder / f).read_text()) for f in sorted(os.listdir(folder))]

    m_ref, m_duca = meta("uncached"), meta("duca")
    assert len(m_ref) == len(m_duca) == 2
    assert duca["flops_ratio"] == pytest.approx(
        sum(m["flops_uncached"] for m in m_duca) / sum(m["flops_actual"] for m in m_duca))
    assert duca["flops_ratio"] > 1.0
    assert duca["speedup"] == pytest.approx(
        sum(m["seconds"] for m in m_ref) / sum(m["seconds"] for m in m_duca))
    fid = fidelity.compare_dirs(str(root / "uncached"), str(root / "duca"))
    assert fid["num_compared"] == 2 and duca["compared_videos"] == 2
    assert duca["psnr"] == pytest.approx(fid["aggregate"]["psnr"])
    assert duca["ssim"] == pytest.approx(fid["aggregate"]["ssim"])
    for run, row in (("uncached", ref), ("duca", duca)):
        r = next(x for x in data["runs"] if x["name"] == run)
        assert set(r["dimensions"]) == set(dims)
        assert row["vbench_total"] is None  # no semantic dimension scored: no Total
        assert row["vbench_quality"] == pytest.approx(r["summary"]["quality"])

    # rerun without ranks: nothing scored again, same table
    assert cli.main(argv) == 0
    assert _scored(capsys.readouterr().out) == []
    assert (tmp_path / "results" / "paper_table.md").read_text() == table
