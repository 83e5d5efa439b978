"""Demo judge: accepts dataset clips with their captions, rejects wrong colour / direction."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from opensora_duca.data import synthetic as S
from opensora_duca.eval.judge import (analyze, caption_from_name, judge, read_video, summarize,
                                      write_video)

N = 50


@pytest.fixture(scope="module")
def clips():
    ds = S.SyntheticShapes("heldout", length=N)
    return [(S.to_uint8(it["video"]), it) for it in (ds[i] for i in range(N))]


def _other(options, value, i):
    opts = [o for o in options if o != value]
    return opts[i % len(opts)]


def test_accepts_own_captions(clips):
    res = [judge(v, it["text"]) for v, it in clips]
    s = summarize(res)
    assert s["n"] == N and s["color"] == s["motion"] == s["both"] == s["shape"] == 1.0
    assert s["flicker"] == 0.0


def test_rejects_wrong_colour_and_wrong_direction(clips):
    for i, (v, it) in enumerate(clips):
        wrong_c = S.caption_for(_other(S.COLORS, it["color"], i), it["shape"], it["direction"])
        r = judge(v, wrong_c)
        assert not r["color_ok"] and not r["ok"] and r["motion_ok"]
        wrong_d = S.caption_for(it["color"], it["shape"], _other(S.DIRECTIONS, it["direction"], i))
        r = judge(v, wrong_d)
        assert not r["motion_ok"] and not r["ok"] and r["color_ok"]
        wrong_s = S.caption_for(it["color"], _other(S.SHAPES, it["shape"], i), it["direction"])
        assert not judge(v, wrong_s)["shape_ok"]


def test_robust_to_h264_and_noise(tmp_path, clips):
    rng = np.random.default_rng(0)
    res = []
    for i, (v, it) in enumerate(clips[:12]):
        path = str(tmp_path / f"{i}.mp4")
        write_video(path, v)
        decoded = read_video(path)
        assert decoded.shape == v.shape
        res.append(judge(decoded, it["text"]))
        noisy = np.clip(v.astype(np.float32) + rng.normal(0, 15, v.shape), 0, 255)
        res.append(judge(noisy.astype(np.uint8), it["text"]))
    s = summarize(res)
    assert s["both"] == 1.0 and s["shape"] >= 0.9


def test_flicker_blank_and_bad_input():
    v = np.zeros((8, 32, 32, 3), np.uint8)
    a = analyze(v)
    assert a["detected_color"] is None and a["detected_direction"] is None
    assert not judge(v, "a red circle staying still")["ok"]
    v[1::2] = 40  # background flashing on odd frames
    assert analyze(v)["flicker"] == pytest.approx(40.0)
    with pytest.raises(ValueError, match=r"shape \(8, 32, 32\).*accepted"):
        judge(np.zeros((8, 32, 32)), "a red circle staying still")
    with pytest.raises(ValueError, match="accepted"):
        judge(np.zeros((8, 32, 32, 3), np.uint8), "a purple circle moving left")


def test_caption_from_name():
    assert caption_from_name("a red circle moving left-3.mp4") == "a red circle moving left"
    assert caption_from_name("dir/a_blue_square_staying_still-0.mp4") == \
        "a blue square staying still"
    assert caption_from_name("a_red_circle_moving_left.mp4") == "a red circle moving left"
    with pytest.raises(ValueError, match="accepted"):
        caption_from_name("-1.mp4")


def test_cli_manifest_and_from_names(tmp_path, clips):
    manifest = {}
    for i, (v, it) in enumerate(clips[:4]):
        write_video(str(tmp_path / f"{it['text']}-{i}.mp4"), v)
        manifest[f"{it['text']}-{i}.mp4"] = it["text"]
    # a wrong caption in the manifest lowers the accuracy
    first = sorted(manifest)[0]
    it0 = S.parse_caption(manifest[first])
    manifest[first] = S.caption_for(_other(S.COLORS, it0["color"], 0), it0["shape"],
                                    it0["direction"])
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "judge.py")
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, tool, "--video-dir", str(tmp_path), "--manifest",
                    str(tmp_path / "m.json"), "--json-out", str(out)], check=True,
                   capture_output=True)
    summary = json.loads(out.read_text())["summary"]
    assert summary["n"] == 4 and summary["color"] == 0.75 and summary["motion"] == 1.0
    r = subprocess.run([sys.executable, tool, "--video-dir", str(tmp_path), "--from-names",
                        "--quiet"], check=True, capture_output=True, text=True)
    assert json.loads(r.stdout)["both"] == 1.0
