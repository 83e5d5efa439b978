"""tools/vbench_generate.py on the tiny config: {prompt}-{i}.mp4 naming, resume (second run
writes nothing, temporary files of dead writers are removed, those of a live writer kept), prompt
slices, a cache policy from --cfg-options, and a 2-rank --data-parallel torchrun run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from write_utils import dead_writer_temp, live_writer

from opensora_duca.cli import vbench_generate as vg
from opensora_duca.utils.video import is_complete_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = os.path.join(ROOT, "configs", "tiny", "inference.py")
PROMPTS = ["a red circle moving left", "a blue square staying still"]
FAST = ["--cfg-options", "scheduler.num_sampling_steps=3", "--device", "cpu", "--no-progress"]


def _prompt_file(tmp_path, prompts=PROMPTS):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(prompts) + "\n\n")
    return str(p)


def _expected(prompts=PROMPTS, n=2):
    return sorted(f"{p}-{i}.mp4" for p in prompts for i in range(n))


def _files(d):
    """The video folder's files (the _meta folder of cost records aside)."""
    return sorted(n for n in os.listdir(d) if os.path.isfile(os.path.join(d, n)))


def _mtimes(d):
    return {n: os.stat(os.path.join(d, n)).st_mtime_ns for n in _files(d)}


def test_naming_resume_and_stale_partial(tmp_path, capsys):
    torch.set_num_threads(1)
    save = tmp_path / "videos"
    args = [CONFIG, "--prompt-path", _prompt_file(tmp_path), "--num-samples", "2",
            "--save-dir", str(save)] + FAST
    assert vg.main(args) == 0
    assert _files(save) == _expected()
    assert all(is_complete_video(str(save / n)) for n in _files(save))
    assert sorted(os.listdir(save / "_meta")) == [n + ".json" for n in _expected()]
    first = _mtimes(save)

    # rerun: everything complete, nothing rewritten
    assert vg.main(args) == 0
    assert _mtimes(save) == first
    assert "4 complete file(s) skipped" in capsys.readouterr().out

    # "killed" run: one video missing, the temporaries of dead writers of it and of a complete
    # one left behind; another process is still writing a third one
    victim = save / f"{PROMPTS[1]}-1.mp4"
    os.remove(victim)
    dead_writer_temp(str(victim), b"half a video")
    dead_writer_temp(str(save / f"{PROMPTS[0]}-0.mp4"), b"junk")
    proc, live = live_writer(str(save / f"{PROMPTS[0]}-1.mp4"))
    try:
        assert vg.main(args) == 0
        assert os.path.exists(live)  # a live writer's temporary is never removed
    finally:
        proc.kill()
        proc.wait()
    os.remove(live)
    out = capsys.readouterr().out
    assert "2 stale partial file(s) removed" in out and "3 complete file(s) skipped" in out
    assert _files(save) == _expected()  # each file once, no temporary left
    assert is_complete_video(str(victim))
    after = _mtimes(save)
    assert {n: t for n, t in after.items() if n != victim.name} == \
        {n: t for n, t in first.items() if n != victim.name}


def test_slice_and_cache_policy(tmp_path, capsys):
    torch.set_num_threads(1)
    save = tmp_path / "videos"
    args = [CONFIG, "--prompt-path", _prompt_file(tmp_path), "--num-samples", "1",
            "--start", "1", "--end", "2", "--save-dir", str(save), "--cfg-options",
            "scheduler.num_sampling_steps=4", "cache.type=DuCa", "--device", "cpu",
            "--no-progress"]
    assert vg.main(args) == 0
    out = capsys.readouterr().out
    assert "cache DuCa" in out and "cache policy   : DuCa" in out
    assert _files(save) == [f"{PROMPTS[1]}-0.mp4"]
    meta = json.loads((save / "_meta" / f"{PROMPTS[1]}-0.mp4.json").read_text())
    assert meta["label"] == "DuCa" and meta["prompt"] == PROMPTS[1] and meta["index"] == 0
    assert meta["cache"]["type"] == "DuCa" and meta["seconds"] > 0 and meta["batch_size"] == 1
    # DuCa computes some of the 4 steps partially or from the cache: fewer analytic FLOPs
    assert 0 < meta["flops_actual"] < meta["flops_uncached"]


def test_bad_args(tmp_path, capsys):
    """Bad input: one line on stderr, exit 2, before any model is built."""
    cases = [
        ([CONFIG, "--num-samples", "0"], "--num-samples"),
        ([CONFIG, "--start", "3", "--end", "1"], "--end"),
        ([CONFIG, "--prompt-path", str(tmp_path / "missing.txt"), "--device", "cpu"],
         "--prompt-path"),
        ([str(tmp_path / "nope.py")], "config"),
        ([CONFIG, "--prompt-path", _prompt_file(tmp_path), "--cfg-options", "cache.type=NoSuch"],
         "NoSuch"),
    ]
    for argv, word in cases:
        assert vg.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], (argv, err)


def test_data_parallel_torchrun(tmp_path):
    from dist_utils import free_port

    prompts = PROMPTS + ["a green circle moving up"]
    save = tmp_path / "videos"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), os.path.join(ROOT, "tools", "vbench_generate.py"),
           CONFIG, "--prompt-path", _prompt_file(tmp_path, prompts), "--num-samples", "2",
           "--save-dir", str(save), "--data-parallel"] + FAST
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _files(save) == _expected(prompts)
    assert "data parallel on 2 rank(s)" in res.stdout
    metas = [json.loads((save / "_meta" / (n + ".json")).read_text()) for n in _expected(prompts)]
    assert {m["mode"] for m in metas} == {"data parallel"} and {m["world_size"] for m in metas} \
        == {2}


def test_sequence_parallel_torchrun(tmp_path):
    """Default under torchrun: both ranks cooperate on every sample, rank 0 writes each once."""
    from dist_utils import free_port

    save = tmp_path / "videos"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), os.path.join(ROOT, "tools", "vbench_generate.py"),
           CONFIG, "--prompt-path", _prompt_file(tmp_path), "--num-samples", "2",
           "--save-dir", str(save), "--cfg-options", "scheduler.num_sampling_steps=4",
           "cache.type=DuCa", "--device", "cpu", "--no-progress"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sequence parallel on 2 rank(s)" in res.stdout
    assert res.stdout.count("vbench_generate:") == 1  # rank 0 prints
    assert _files(save) == _expected()
