import glob
import json
import os
import sys

import numpy as np
import pytest
from write_utils import dead_writer_temp

from opensora_duca.eval import vbench as vb
from opensora_duca.utils.video import save_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HAVE_VBENCH_FILES = __import__("importlib").util.find_spec("vbench") is not None
needs_vbench_files = pytest.mark.skipif(
    not HAVE_VBENCH_FILES, reason="vbench package not installed (" + vb.INSTALL_HINT + ")"
)


# ---------------------------------------------------------------- prompts and naming
@needs_vbench_files
def test_prompt_suite_comes_from_installed_package():
    path = vb.full_info_json_path()
    assert os.path.dirname(path) == vb.vbench_package_dir()
    # never a copy inside the project's own folders
    for sub in ("opensora_duca", "tools", "tests", "configs"):
        assert not glob.glob(os.path.join(ROOT, sub, "**", "VBench_full_info.json"), recursive=True)
    entries = json.load(open(path, encoding="utf-8"))
    assert len(entries) == 946
    prompts = vb.load_prompts()
    assert prompts[0] == entries[0]["prompt_en"]
    assert len(prompts) == len({e["prompt_en"] for e in entries})
    tf = vb.load_prompts(dimensions=["temporal_flickering"])
    assert 0 < len(tf) < len(prompts)
    assert set(tf) == {e["prompt_en"] for e in entries if "temporal_flickering" in e["dimension"]}
    assert all("/" not in p for p in prompts)
    with pytest.raises(ValueError, match="unknown VBench dimensions"):
        vb.load_prompts(dimensions=["sharpness"])


def test_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \na cat\n", encoding="utf-8")
    assert vb.load_prompts(prompt_path=str(f)) == ["a cat", "a dog"]
    with pytest.raises(ValueError):
        vb.load_prompts(prompt_path=str(f), dimensions=["scene"])


def test_video_filename():
    assert vb.video_filename("a red car", 3) == "a red car-3.mp4"
    with pytest.raises(ValueError, match="'/'"):
        vb.video_filename("a/b", 0)
    with pytest.raises(ValueError, match="255"):
        vb.video_filename("x" * 300, 0)


# ---------------------------------------------------------------- jobs, resume, sharding
def test_list_jobs_skips_complete_files_only(tmp_path):
    prompts = ["p zero", "p one", "p two"]
    out = str(tmp_path)
    frames = np.full((2, 16, 16, 3), 90, np.uint8)
    save_video(frames, os.path.join(out, "p zero-1.mp4"))  # complete -> skipped
    # an interrupted write of p zero-2: only the temporary exists -> still a job
    dead_writer_temp(
        os.path.join(out, "p zero-2.mp4"), open(os.path.join(out, "p zero-1.mp4"), "rb").read()
    )
    open(os.path.join(out, "p one-0.mp4"), "wb").close()  # empty file -> still a job
    with open(os.path.join(out, "p one-1.mp4"), "wb") as f:  # truncated garbage -> still a job
        f.write(b"\x00\x00\x00\x18ftypmp42")
    jobs = vb.list_jobs(prompts, out, num_samples=3, base_seed=42)
    keys = [(j.prompt, j.index) for j in jobs]
    assert ("p zero", 1) not in keys
    assert len(jobs) == 3 * 3 - 1
    assert ("p zero", 2) in keys and ("p one", 0) in keys and ("p one", 1) in keys
    j = next(j for j in jobs if (j.prompt, j.index) == ("p two", 2))
    assert j.seed == 44 and j.path == os.path.join(out, "p two-2.mp4") and j.prompt_index == 2
    assert len(vb.list_jobs(prompts, out, num_samples=3, skip_complete=False)) == 9
    # --start/--end select prompts
    sub = vb.list_jobs(prompts, out, num_samples=3, start=1, end=2)
    assert {x.prompt for x in sub} == {"p one"} and len(sub) == 3
    assert vb.list_jobs(prompts, out, num_samples=1, start=2, end=99)[0].prompt == "p two"
    with pytest.raises(ValueError):
        vb.list_jobs(prompts, out, num_samples=0)


def test_shard_is_a_disjoint_cover():
    items = list(range(11))
    shards = [vb.shard(items, r, 3) for r in range(3)]
    assert shards[0] == [0, 3, 6, 9]
    assert sorted(sum(shards, [])) == items
    for bad in [(3, 3), (-1, 3), (0, 0)]:
        with pytest.raises(ValueError):
            vb.shard(items, *bad)


# ---------------------------------------------------------------- normalisation
def test_normalize_by_hand():
    assert vb.normalize_score("temporal_flickering", 0.9) == pytest.approx(
        (0.9 - 0.6293) / (1.0 - 0.6293)
    )
    assert vb.normalize_score("motion_smoothness", 0.99) == pytest.approx(
        (0.99 - 0.706) / (0.9975 - 0.706)
    )
    assert vb.normalize_score("dynamic_degree", 0.6) == pytest.approx(0.3)  # weight 0.5
    assert vb.normalize_score("scene", 0.4111) == pytest.approx(0.5)
    assert vb.normalize_score("color", 0.8) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        vb.normalize_score("sharpness", 0.5)


def test_final_scores_full_set_by_hand():
    lo = {d: vb.NORMALIZE_MIN_MAX[d][0] for d in vb.ALL_DIMENSIONS}
    hi = {d: vb.NORMALIZE_MIN_MAX[d][1] for d in vb.ALL_DIMENSIONS}
    s = vb.final_scores(hi)
    assert s["quality"] == pytest.approx(100.0) and s["semantic"] == pytest.approx(100.0)
    assert s["total"] == pytest.approx(100.0) and s["complete"] and s["notes"] == []
    assert vb.final_scores(lo)["total"] == pytest.approx(0.0)
    mixed = dict(hi)
    mixed["dynamic_degree"] = 0.0  # quality: 6 of 6.5
    mixed["scene"] = 0.0  # semantic: 8 of 9
    s = vb.final_scores(mixed)
    q, sem = 6.0 / 6.5, 8.0 / 9.0
    assert s["quality"] == pytest.approx(100 * q)
    assert s["semantic"] == pytest.approx(100 * sem)
    assert s["total"] == pytest.approx(100 * (4 * q + sem) / 5)


def test_final_scores_partial_set_is_flagged():
    s = vb.final_scores({"temporal_flickering": 0.9, "dynamic_degree": 0.6, "scene": 0.4111})
    q = ((0.9 - 0.6293) / 0.3707 + 0.3) / 1.5
    assert s["quality"] == pytest.approx(100 * q)
    assert s["semantic"] == pytest.approx(50.0)
    assert s["total"] == pytest.approx(100 * (4 * q + 0.5) / 5)
    assert s["quality_dims"] == ["temporal_flickering", "dynamic_degree"] and s[
        "semantic_dims"
    ] == ["scene"]
    assert not s["complete"] and "partial" in s["notes"][0]
    only_q = vb.final_scores({"temporal_flickering": 0.9})
    assert only_q["semantic"] is None and only_q["total"] is None and len(only_q["notes"]) == 2


# ---------------------------------------------------------------- weights plan
def test_plan_dimensions(tmp_path):
    (tmp_path / "clip_model").mkdir()
    (tmp_path / "clip_model" / "ViT-B-32.pt").write_bytes(b"x")
    runnable, missing = vb.plan_dimensions(
        [
            "temporal_flickering",
            "background_consistency",
            "appearance_style",
            "subject_consistency",
            "dynamic_degree",
        ],
        str(tmp_path),
    )
    assert runnable == ["temporal_flickering", "background_consistency", "appearance_style"]
    assert missing["dynamic_degree"] == [
        str(tmp_path / "raft_model" / "models" / "raft-things.pth")
    ]
    assert (
        str(tmp_path / "dino_model" / "dino_vitbase16_pretrain.pth")
        in missing["subject_consistency"]
    )
    runnable, missing = vb.plan_dimensions(None, str(tmp_path))
    assert len(runnable) + len(missing) == 16
    with pytest.raises(ValueError):
        vb.plan_dimensions(["sharpness"], str(tmp_path))


@needs_vbench_files
def test_required_file_names_match_installed_vbench_source():
    src = ""
    for p in glob.glob(os.path.join(vb.vbench_package_dir(), "*.py")):
        src += open(p, encoding="utf-8").read()
    for dim, files in vb.REQUIRED_FILES.items():
        for rel in files:
            if rel.endswith("hubconf.py"):  # torch.hub local repo folder: check the folder name
                rel = os.path.dirname(rel)
            assert os.path.basename(rel) in src, (dim, rel)
            folder = rel.split("/")[0]
            assert f"{folder}/" in src or f'"{folder}' in src or folder in src, (dim, rel)


# ---------------------------------------------------------------- the genuine vbench code
def _import_vbench_or_skip():
    try:
        return vb.import_vbench()
    except vb.VBenchUnavailable as e:
        pytest.skip(f"vbench cannot be imported here: {e}")


def test_torchvision_importable_after_shim():
    _import_vbench_or_skip()
    import torchvision  # noqa: F401  (imported by vbench; must not raise)

    assert "torchvision" in sys.modules


def test_real_temporal_flickering(tmp_path):
    _import_vbench_or_skip()
    prompt = vb.load_prompts(dimensions=["temporal_flickering"])[0]
    rng = np.random.default_rng(0)
    base = np.clip(108 + rng.integers(-20, 21, size=(1, 64, 64, 3)), 0, 255).astype(np.uint8)
    base = np.repeat(base, 2, axis=1).repeat(2, axis=2)[:, :64, :64]  # some spatial texture
    steady = np.repeat(base, 16, axis=0)
    flicker = steady.copy()
    flicker[1::2] = np.clip(flicker[1::2].astype(int) + 40, 0, 255).astype(np.uint8)

    steady_dir, flicker_dir = tmp_path / "steady", tmp_path / "flicker"
    save_video(steady, str(steady_dir / vb.video_filename(prompt, 0)))
    save_video(flicker, str(flicker_dir / vb.video_filename(prompt, 0)))
    # a stray temporary file must not confuse VBench's folder listing
    (steady_dir / ".late-0.mp4.partial").write_bytes(b"half")
    weights = tmp_path / "weights"
    weights.mkdir()

    # vbench_standard: the suite prompt's file name; the other 4 samples (and other prompts) are
    # missing
    r1 = vb.evaluate(
        str(steady_dir),
        str(weights),
        dimensions=["temporal_flickering", "dynamic_degree"],
        output_dir=str(tmp_path / "out1"),
        mode="vbench_standard",
    )
    assert r1["skipped_missing_weights"] == {
        "dynamic_degree": [str(weights / "raft_model" / "models" / "raft-things.pth")]
    }
    assert r1["failed"] == {}
    assert r1["not_evaluated_files"] == [".late-0.mp4.partial"]
    tf = r1["dimensions"]["temporal_flickering"]
    assert tf["num_videos"] == 1
    assert (
        r1["missing_videos"]["temporal_flickering"]["missing"]
        == r1["missing_videos"]["temporal_flickering"]["expected"] - 1
    )
    steady_score = tf["raw"]
    # vbench wrote its own result file
    assert os.path.isfile(tmp_path / "out1" / "opensora_duca_temporal_flickering_eval_results.json")

    r2 = vb.evaluate(
        str(flicker_dir),
        str(weights),
        dimensions=["temporal_flickering"],
        output_dir=str(tmp_path / "out2"),
        mode="custom_input",
    )
    flicker_score = r2["dimensions"]["temporal_flickering"]["raw"]

    assert steady_score > 0.99
    assert flicker_score == pytest.approx((255 - 40) / 255, abs=0.01)  # ~0.843
    assert steady_score > flicker_score
    assert r2["dimensions"]["temporal_flickering"]["normalized"] == pytest.approx(
        100 * vb.normalize_score("temporal_flickering", flicker_score)
    )
    assert (
        r2["summary"]["quality_dims"] == ["temporal_flickering"] and r2["summary"]["total"] is None
    )


def test_vbench_cli(tmp_path, capsys):
    _import_vbench_or_skip()
    from opensora_duca.cli import vbench_evaluate as cli

    vids = tmp_path / "v"
    save_video(np.full((4, 32, 32, 3), 100, np.uint8), str(vids / "a calm lake-0.mp4"))
    (tmp_path / "w").mkdir()
    out = tmp_path / "r.json"
    common = [str(vids), "--weights-dir", str(tmp_path / "w"), "--mode", "custom_input",
              "--output-dir", str(tmp_path / "o"), "--json", str(out)]
    # missing weights are an error before any work (one line, exit 2) ...
    rc = cli.main(common + ["--dimensions", "temporal_flickering", "dynamic_degree"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "raft-things.pth" in err[0]
    assert not (tmp_path / "o").exists()
    # ... unless asked to score the others
    rc = cli.main(common + ["--dimensions", "temporal_flickering", "dynamic_degree",
                            "--skip-missing-weights"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| quality | temporal_flickering |" in text and "skipped: missing weights" in text
    data = json.loads(out.read_text())
    assert "dynamic_degree" in data["skipped_missing_weights"]
    assert cli.main([str(tmp_path / "none"), "--weights-dir", str(tmp_path / "w")]) == 2
