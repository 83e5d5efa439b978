import json
import math
import os

import numpy as np
import pytest
import torch

from opensora_duca.eval import fidelity as fid
from opensora_duca.utils.video import save_video


# ---------------------------------------------------------------- independent reference for SSIM
def ssim_numpy_loop(x, y):
    """Straightforward SSIM of one [H, W] channel in [0, 1]: 11x11 Gaussian (sigma 1.5) weights,
    C1 = 0.01^2, C2 = 0.03^2, only windows fully inside the image, mean of the map."""
    k = 11
    ax = np.arange(k) - 5.0
    g = np.exp(-(ax ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g)
    w /= w.sum()
    h, wd = x.shape
    vals = []
    for i in range(h - k + 1):
        for j in range(wd - k + 1):
            px = x[i : i + k, j : j + k]
            py = y[i : i + k, j : j + k]
            mx = (w * px).sum()
            my = (w * py).sum()
            vx = (w * (px - mx) ** 2).sum()
            vy = (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            c1, c2 = 0.01 ** 2, 0.03 ** 2
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2))
                        / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_identical_videos():
    a = torch.rand(4, 3, 16, 16)
    assert fid.psnr(a, a.clone()) == 100.0
    assert fid.ssim(a, a.clone()) == pytest.approx(1.0, abs=1e-12)


def test_psnr_known_noise_levels():
    # frame 0: +-0.1 checkerboard -> MSE 0.01 -> 20 dB; frame 1: +-0.01 -> MSE 1e-4 -> 40 dB
    a = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    sign = torch.ones(8, 8, dtype=torch.float64)
    sign[::2, ::2] = -1
    sign[1::2, 1::2] = -1
    b = a.clone()
    b[0] += 0.1 * sign
    b[1] += 0.01 * sign
    per = fid.psnr_per_frame(a, b)
    assert per[0].item() == pytest.approx(10 * math.log10(1 / 0.01))  # = 20
    assert per[1].item() == pytest.approx(10 * math.log10(1 / 1e-4))  # = 40
    assert fid.psnr(a, b) == pytest.approx(30.0)


def test_psnr_data_range_and_layouts():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(3, 3, 12, 12)).astype(np.uint8)  # [T, C, H, W]
    b = np.clip(a.astype(int) + rng.integers(-5, 6, size=a.shape), 0, 255).astype(np.uint8)
    ref = fid.psnr(a.astype(np.float64) / 255, b.astype(np.float64) / 255)
    assert fid.psnr(a, b, data_range=255) == pytest.approx(ref)
    # [-1, 1] frames with data_range 2 (PSNR is shift invariant)
    a2 = torch.from_numpy(a.astype(np.float64) / 255 * 2 - 1)
    b2 = torch.from_numpy(b.astype(np.float64) / 255 * 2 - 1)
    assert fid.psnr(a2, b2, data_range=2.0) == pytest.approx(ref)
    # the same video as a latent-style [B, C, T, H, W] batch
    a5 = torch.from_numpy(a).permute(1, 0, 2, 3).unsqueeze(0)
    b5 = torch.from_numpy(b).permute(1, 0, 2, 3).unsqueeze(0)
    assert fid.psnr(a5, b5, data_range=255, layout="BCTHW") == pytest.approx(ref)
    assert fid.ssim(a5, b5, data_range=255, layout="BCTHW") == pytest.approx(
        fid.ssim(a, b, data_range=255))


def test_batch_aggregation_per_frame_index():
    # video 0: frame PSNRs 20, 40; video 1: 40, 40 -> per index 30, 40 -> 35
    a = torch.full((2, 2, 1, 8, 8), 0.5, dtype=torch.float64)
    b = a.clone()
    b[0, 0] += 0.1
    b[0, 1] += 0.01
    b[1, :] += 0.01
    assert fid.psnr(a, b) == pytest.approx(35.0)
    # unequal lengths: [10, 20] and [30] -> index 0: 20, index 1: 20 -> 20
    assert fid.aggregate_per_frame([[10.0, 20.0], [30.0]]) == pytest.approx(20.0)
    assert fid.aggregate_per_frame([]) is None


def test_ssim_constant_images_by_hand():
    a = torch.full((1, 1, 16, 16), 0.5, dtype=torch.float64)
    b = torch.full((1, 1, 16, 16), 0.6, dtype=torch.float64)
    c1 = 0.01 ** 2
    # variances are 0: the C2 term is 1
    expected = (2 * 0.5 * 0.6 + c1) / (0.5 ** 2 + 0.6 ** 2 + c1)
    assert fid.ssim(a, b) == pytest.approx(expected, abs=1e-12)


def test_ssim_matches_numpy_loop():
    rng = np.random.default_rng(1)
    a = rng.random((2, 3, 17, 19))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    ref_frames = [np.mean([ssim_numpy_loop(a[t, c], b[t, c]) for c in range(3)]) for t in range(2)]
    got = fid.ssim_per_frame(torch.from_numpy(a), torch.from_numpy(b))
    assert got.tolist() == pytest.approx(ref_frames, abs=1e-10)
    assert fid.ssim(a, b) == pytest.approx(float(np.mean(ref_frames)), abs=1e-10)


def test_benchmark_frame_fidelity_values():
    """The benchmark's psnr_frames / ssim_frames (decoded frames [B, 3, T, H, W] in [-1, 1])
    against the float64 loops above, on frames mapped to [0, 1]."""
    from opensora_duca.bench.measure import frame_fidelity

    rng = np.random.default_rng(2)
    ref = rng.uniform(-1, 1, size=(2, 3, 3, 13, 12))
    out = np.clip(ref + 0.2 * rng.standard_normal(ref.shape), -1, 1)
    same = frame_fidelity(torch.from_numpy(ref), torch.from_numpy(ref.copy()))
    assert same["psnr_frames"] == 100.0 and same["ssim_frames"] == pytest.approx(1.0, abs=1e-12)
    got = frame_fidelity(torch.from_numpy(out), torch.from_numpy(ref))
    a, b = (out + 1) / 2, (ref + 1) / 2
    # equal frame counts: the per-frame-index aggregation is the plain mean over videos x frames
    want_ssim = np.mean([ssim_numpy_loop(a[i, c, t], b[i, c, t])
                         for i in range(2) for t in range(3) for c in range(3)])
    mse = ((a - b) ** 2).mean(axis=(1, 3, 4))  # [B, T]
    want_psnr = np.mean(10 * np.log10(1 / mse))
    assert got["ssim_frames"] == pytest.approx(want_ssim, abs=1e-10)
    assert got["psnr_frames"] == pytest.approx(want_psnr, abs=1e-9)
    assert got["ssim_frames"] < 0.99  # a real difference


def test_shape_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        fid.psnr(torch.zeros(2, 3, 16, 16), torch.zeros(3, 3, 16, 16))
    with pytest.raises(ValueError, match="at least 11x11"):
        fid.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        fid.psnr(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))


def test_lpips_optional_reports_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    ok, msg = fid.lpips_status()
    assert not ok
    assert ("lpips" in msg and "not installed" in msg) or fid.ALEXNET_WEIGHTS in msg
    val, msg2 = fid.lpips_distance(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    assert val is None and msg2 == msg


# ---------------------------------------------------------------- directories
def _frames(level, t=4, h=24, w=24):
    x = np.zeros((t, h, w, 3), np.uint8)
    x[:] = np.linspace(40, 200, w, dtype=np.uint8)[None, None, :, None]
    return np.clip(x.astype(int) + level, 0, 255).astype(np.uint8)


@pytest.fixture
def two_dirs(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir(), b.mkdir()
    save_video(_frames(0), str(a / "same-0.mp4"))
    (b / "same-0.mp4").write_bytes((a / "same-0.mp4").read_bytes())  # byte-identical
    save_video(_frames(0), str(a / "diff-0.mp4"))
    save_video(_frames(12), str(b / "diff-0.mp4"))
    save_video(_frames(0), str(a / "only_a-0.mp4"))
    save_video(_frames(0), str(b / "only_b-0.mp4"))
    save_video(_frames(0), str(a / "broken-0.mp4"))
    (b / "broken-0.mp4").write_bytes(b"\x00garbage" * 20)
    save_video(_frames(0, t=4), str(a / "short-0.mp4"))
    save_video(_frames(0, t=3), str(b / "short-0.mp4"))
    (b / ".pending-0.mp4.partial").write_bytes(b"half")
    (b / "notes.txt").write_text("x")
    return str(a), str(b)


def test_compare_dirs_reports_everything(two_dirs):
    a, b = two_dirs
    res = fid.compare_dirs(a, b)
    assert res["matched"] == ["broken-0.mp4", "diff-0.mp4", "same-0.mp4", "short-0.mp4"]
    assert res["only_in_a"] == ["only_a-0.mp4"]
    assert res["only_in_b"] == ["only_b-0.mp4"]
    assert [(u["name"], u["dir"]) for u in res["unreadable"]] == [
        ("broken-0.mp4", os.path.abspath(b))]
    assert res["unreadable"][0]["error"]
    assert [m["name"] for m in res["mismatched"]] == ["short-0.mp4"]
    assert res["mismatched"][0]["compared"] is True
    assert any(p.endswith(".pending-0.mp4.partial") for p in res["ignored_partial"])
    assert any(p.endswith("notes.txt") for p in res["ignored_other"])
    pv = res["per_video"]
    assert set(pv) == {"same-0.mp4", "diff-0.mp4", "short-0.mp4"}
    assert pv["same-0.mp4"]["psnr"] == 100.0 and pv["same-0.mp4"]["ssim"] == pytest.approx(1.0)
    assert 20 < pv["diff-0.mp4"]["psnr"] < 40
    assert pv["short-0.mp4"]["num_frames"] == 3
    assert res["num_compared"] == 3
    # aggregate: per frame index over videos, then over indices
    from opensora_duca.utils.video import read_video

    series = []
    for n in ["diff-0.mp4", "same-0.mp4", "short-0.mp4"]:
        fa, fb = read_video(os.path.join(a, n)), read_video(os.path.join(b, n))
        t = min(len(fa), len(fb))
        ta, tb = fid.uint8_video_to_frames(fa[:t]), fid.uint8_video_to_frames(fb[:t])
        series.append(fid.psnr_per_frame(ta, tb).tolist())
    per_index = [np.mean([s[i] for s in series if len(s) > i]) for i in range(4)]
    assert res["aggregate"]["psnr"] == pytest.approx(float(np.mean(per_index)))
    assert res["aggregate"]["lpips"] is None


def test_compare_dirs_lpips_missing_is_explicit(two_dirs, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    res = fid.compare_dirs(*two_dirs, use_lpips=True)
    assert res["aggregate"]["lpips"] is None
    assert res["lpips_message"].startswith("LPIPS unavailable")


def test_cli(two_dirs, tmp_path, capsys):
    from opensora_duca.cli import fidelity as cli

    a, b = two_dirs
    out = tmp_path / "res" / "fid.json"
    assert cli.main([a, b, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| same-0.mp4 |" in text and "only in A" in text and "UNREADABLE" in text
    data = json.loads(out.read_text())
    assert data["num_compared"] == 3
    assert os.listdir(out.parent) == ["fid.json"]  # no temporary left behind
    assert cli.main([a, str(tmp_path / "nope")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([a, str(empty)]) == 2
    assert "no video file names match" in capsys.readouterr().err
