"""tools/inference.py end to end on the tiny config: playable mp4s, resume, and a 2-rank
torchrun run that reproduces the single-process latents and frames."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from dist_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "inference.py")
CONFIG = os.path.join(ROOT, "configs", "tiny", "inference.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return env


def _run(cmd, timeout=120):
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    save = tmp_path_factory.mktemp("single")
    out = _run([sys.executable, TOOL, CONFIG, "--save-dir", str(save), "--save-latents",
                "--no-progress"])
    return save, out


def test_single_process_writes_playable_videos(single_run):
    import av
    save, out = single_run
    assert "=== inference summary ===" in out and "ranks: 1" in out
    assert "10 steps" in out and "32x32" in out
    for i in range(2):
        path = save / f"sample_{i:04d}.mp4"
        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
        assert len(frames) == 8 and frames[0].shape == (32, 32, 3)
        assert (save / f"sample_{i:04d}.latents.pt").is_file()
    assert not [p for p in os.listdir(save) if p.endswith(".partial")]


def test_rerun_skips_existing(single_run, tmp_path):
    save, _ = single_run
    copy = tmp_path / "copy"
    shutil.copytree(save, copy)
    os.remove(copy / "sample_0001.mp4")
    before = os.path.getmtime(copy / "sample_0000.mp4")
    out = _run([sys.executable, TOOL, CONFIG, "--save-dir", str(copy), "--save-latents",
                "--no-progress"])
    assert "[skip]" in out and "sample_0000.mp4 exists" in out
    assert "1 written, 1 skipped" in out
    assert os.path.getmtime(copy / "sample_0000.mp4") == before
    # the regenerated prompt 1 (now in a batch of one) has the first run's latents (noise seed
    # = seed + prompt index), up to float rounding of the different batch size
    a = torch.load(save / "sample_0001.latents.pt")
    b = torch.load(copy / "sample_0001.latents.pt")
    assert (a - b).abs().max().item() < 1e-4


def test_two_rank_torchrun_matches_single_process(single_run, tmp_path):
    from opensora_duca.utils.video import read_video
    save, _ = single_run
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                TOOL, CONFIG, "--save-dir", str(tmp_path), "--save-latents", "--no-progress"])
    assert "ranks: 2 (sequence parallel: on)" in out
    assert out.count("=== inference summary ===") == 1  # rank 0 only
    for i in range(2):
        a = torch.load(save / f"sample_{i:04d}.latents.pt")
        b = torch.load(tmp_path / f"sample_{i:04d}.latents.pt")
        assert (a - b).abs().max().item() < 1e-4
        fa = read_video(str(save / f"sample_{i:04d}.mp4")).astype(int)
        fb = read_video(str(tmp_path / f"sample_{i:04d}.mp4")).astype(int)
        assert fa.shape == fb.shape and np.abs(fa - fb).max() <= 2


def test_cli_overrides_and_bad_options(tmp_path):
    out = _run([sys.executable, TOOL, CONFIG, "--save-dir", str(tmp_path), "--no-progress",
                "--prompt", "a green triangle moving up", "--num-frames", "4",
                "--image-size", "16", "24", "--num-sampling-steps", "2", "--seed", "3",
                "--prompt-as-path", "--cfg-options", "model.depth=1"])
    assert "2 steps" in out and "16x24" in out and "4 frames" in out and "seed 3" in out
    assert (tmp_path / "a_green_triangle_moving_up.mp4").is_file()
    res = subprocess.run([sys.executable, TOOL, CONFIG, "--save-dir", str(tmp_path),
                          "--cfg-options", "model.type=NoSuchModel"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "NoSuchModel" in res.stderr and "STDiT3-S/2" in res.stderr


def test_cache_report_in_summary(tmp_path):
    out = _run([sys.executable, TOOL, CONFIG, "--save-dir", str(tmp_path), "--no-progress",
                "--prompt", "a red circle moving left", "--cfg-options", "cache.type=DuCa"])
    assert "--- cache ---" in out and "cache policy   : DuCa" in out and "FLOPs ratio" in out
    assert (tmp_path / "sample_0000.mp4").is_file()


def test_prompts_with_one_file_name_get_distinct_files(tmp_path):
    prompts = ["a red circle!", "a red circle?"]  # both make the file name "a_red_circle"
    cmd = [sys.executable, TOOL, CONFIG, "--save-dir", str(tmp_path), "--no-progress",
           "--num-sampling-steps", "2", "--prompt-as-path", "--prompt", *prompts]
    out = _run(cmd)
    assert "2 written, 0 skipped" in out
    expected = sorted(f"a_red_circle-{hashlib.sha1(p.encode()).hexdigest()[:8]}{ext}"
                      for p in prompts for ext in (".mp4", ".json"))  # video and its record
    assert sorted(os.listdir(tmp_path)) == expected
    out = _run(cmd)  # a rerun finds both
    assert "0 written, 2 skipped" in out


def test_sample_name_must_stay_inside_save_dir(tmp_path):
    save = tmp_path / "save"
    for bad in ("../escape", "/abs/name", "a/b", ""):
        res = subprocess.run([sys.executable, TOOL, CONFIG, "--save-dir", str(save),
                              "--no-progress", "--sample-name", bad], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and f"sample_name={bad!r} is not accepted" in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == []  # nothing written, inside or outside


def test_write_failure_is_not_called_a_config_error(tmp_path, monkeypatch, capsys):
    from opensora_duca.cli import inference

    def broken_disk(*args, **kwargs):
        raise FileNotFoundError("the disk went away")

    monkeypatch.setattr(inference, "save_video", broken_disk)
    rc = inference.main([CONFIG, "--save-dir", str(tmp_path), "--no-progress", "--prompt",
                         "a red circle", "--num-sampling-steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err == (f"inference.py: error: could not write {tmp_path / 'sample_0000.mp4'}: "
                   f"FileNotFoundError: the disk went away")
