"""tools/train.py: rflow training lowers the loss, resumes bit-identically, exports a bundle."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from opensora_duca.cli import train as T

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

TINY = dict(
    model=dict(type="STDiT3-demo", depth=1, hidden_size=32, num_heads=2),
    text_encoder=dict(type="DemoTextEncoder", output_dim=16, model_max_length=8),
    vae=dict(type="DemoCodec"),
    dataset=dict(type="SyntheticShapes", split="train", length=64, seed=0),
    seed=3, batch_size=4, steps=6, lr=3e-3, warmup_steps=2, lr_schedule="constant",
    ema_decay=0.9, ckpt_every=3, log_every=2, num_threads=1, export=None,
)


def cfg_for(tmp_path, name, **kw):
    return T.load_config(dict(TINY, outputs=str(tmp_path / name), **kw))


def final_state(cfg):
    return torch.load(os.path.join(cfg["outputs"], "checkpoints", "last.pt"), weights_only=True)


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("trainee", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert a["history"] == b["history"]


@torch.no_grad()
def fixed_loss(trainee, cfg, seed=0):
    trainee.eval()
    te, vae = trainee.text_encoder, T.build_module(cfg["vae"], T.VAES)
    ds = T.build_module(dict(cfg["dataset"], split="heldout"), T.DATASETS)
    video, ids, mask = T.get_batch(ds, list(range(16)), te)
    x0 = vae.encode(video)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.sigmoid(torch.randn(16, generator=g)) * 1000
    tau = (t / 1000).view(-1, 1, 1, 1, 1)
    out = trainee(x0 * (1 - tau) + tau * noise, t, ids, mask, torch.zeros(16, dtype=torch.bool))
    return float(((out[:, :x0.shape[1]] - (x0 - noise)) ** 2).mean())


def test_training_lowers_loss(tmp_path):
    cfg = cfg_for(tmp_path, "a", steps=40, ckpt_every=40)
    torch.manual_seed(cfg["seed"])
    before = fixed_loss(T.build_trainee(cfg)[0], cfg)
    summary = T.train(cfg, resume=False, progress=False)
    assert summary["finished"] and summary["step"] == 40
    trainee = T.build_trainee(cfg)[0]
    trainee.load_state_dict(final_state(cfg)["trainee"])
    after = fixed_loss(trainee, cfg)
    assert after < 0.8 * before, (before, after)
    log = [json.loads(line) for line in open(os.path.join(cfg["outputs"], "log.jsonl"))]
    assert [r["step"] for r in log] == list(range(2, 41, 2))


def test_resume_is_bit_identical(tmp_path):
    full = cfg_for(tmp_path, "full")
    T.train(full, resume=False, progress=False)
    part = cfg_for(tmp_path, "part")
    s = T.train(part, resume=False, stop_after=2, progress=False)  # "killed" after step 2
    assert not s["finished"] and final_state(part)["step"] == 2
    s = T.train(part, progress=False)  # automatic resume from the output folder
    assert s["finished"]
    assert_same_state(final_state(full), final_state(part))


def test_hard_kill_and_sigterm_lose_no_progress(tmp_path):
    """SIGKILL after a checkpoint -> resume recomputes identically; SIGTERM checkpoints."""
    out = tmp_path / "killed"
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("".join(f"{k} = {v!r}\n" for k, v in dict(
        TINY, outputs=str(out), steps=10_000, ckpt_every=2).items()))
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"), str(cfg_file),
           "--no-progress"]
    ckpt = out / "checkpoints" / "last.pt"
    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = subprocess.Popen(cmd, cwd=str(tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        t0 = time.time()
        start = final_state(dict(outputs=str(out)))["step"] if ckpt.exists() else 0
        while time.time() - t0 < 120:
            if ckpt.exists() and final_state(dict(outputs=str(out)))["step"] >= start + 4:
                break
            time.sleep(0.2)
        proc.send_signal(sig)
        rc = proc.wait(60)
        assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM), \
            proc.stdout.read()
    reached = final_state(dict(outputs=str(out)))["step"]
    assert reached >= 8
    # continue to reached + 3 and compare with an uninterrupted run of that length
    n = reached + 3
    resumed = T.load_config(dict(TINY, outputs=str(out), steps=n, ckpt_every=2))
    T.train(resumed, progress=False)
    ref = cfg_for(tmp_path, "ref", steps=n, ckpt_every=2)
    T.train(ref, resume=False, progress=False)
    assert_same_state(final_state(resumed), final_state(ref))


def test_export_bundle(tmp_path):
    from safetensors import safe_open

    from opensora_duca.models.checkpoint import load_checkpoint
    from opensora_duca.registry import MODELS, TEXT_ENCODERS, build_module
    path = str(tmp_path / "assets" / "demo.safetensors")
    cfg = cfg_for(tmp_path, "exp", steps=3, export=path)
    s = T.train(cfg, resume=False, progress=False)
    assert os.path.getsize(path) < 20 * 2 ** 20
    with safe_open(path, "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert int(meta["steps"]) == 3 and int(meta["seed"]) == 3
    assert float(meta["final_loss"]) == pytest.approx(s["final_loss"], rel=1e-5)
    mcfg = json.loads(meta["config"])["model"]
    assert mcfg["caption_channels"] == 16 and mcfg["in_channels"] == 12
    assert mcfg["temporal_pos_embed"] is True  # the STDiT3-demo preset's (weight-free) option
    assert all(k.startswith(("model.", "text_encoder.")) for k in keys)
    ema = final_state(cfg)["ema"]
    mcfg.pop("type")
    model = build_module(dict(type="STDiT3-demo", **mcfg), MODELS)
    load_checkpoint(model, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[f"model.{k}"].to(v.dtype)), k
    te = build_module(dict(cfg["text_encoder"], from_pretrained=path), TEXT_ENCODERS)
    for k, v in te.state_dict().items():
        assert torch.equal(v, ema[f"text_encoder.{k}"]), k


def test_config_errors_name_key_value_and_accepted(tmp_path):
    with pytest.raises(ValueError, match=r"lr_schedule='linear'.*accepted.*cosine"):
        cfg_for(tmp_path, "x", lr_schedule="linear")
    with pytest.raises(ValueError, match=r"batch_size=0.*accepted"):
        cfg_for(tmp_path, "x", batch_size=0)
    with pytest.raises(ValueError, match=r"steps=6 and epochs=1.*exactly one"):
        cfg_for(tmp_path, "x", epochs=1)
    with pytest.raises(KeyError, match=r"'vae'.*accepted"):
        T.load_config({k: v for k, v in TINY.items() if k != "vae"})
    frozen = type("FrozenEncoder", (), dict(output_dim=16, model_max_length=8))()
    with pytest.raises(ValueError, match=r"text_encoder=.*accepted.*DemoTextEncoder"):
        T.build_trainee(dict(cfg_for(tmp_path, "x"), text_encoder=frozen))


def test_data_parallel_two_ranks(tmp_path):
    cfg_file = tmp_path / "cfg.py"
    out = tmp_path / "ddp"
    cfg_file.write_text("".join(f"{k} = {v!r}\n" for k, v in dict(
        TINY, outputs=str(out), steps=3).items()))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29631", os.path.join(ROOT, "tools", "train.py"),
                        str(cfg_file), "--no-progress"], cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    ck = final_state(dict(outputs=str(out)))
    assert ck["world_size"] == 2 and ck["step"] == 3 and len(ck["rng"]["generators"]) == 2
    s = T.StepSampler(64, 4, 2, 3)
    assert not set(s.indices(0, 0)) & set(s.indices(0, 1))  # each rank its own shard


def test_time_limit_finishes_early_and_exports(tmp_path):
    from safetensors import safe_open
    path = str(tmp_path / "demo.safetensors")
    cfg = cfg_for(tmp_path, "tl", steps=50, time_limit=1e-6, export=path)
    s = T.train(cfg, resume=False, progress=False)
    assert s["finished"] and s["time_limited"] and s["step"] == 1
    with safe_open(path, "pt") as f:
        assert int(f.metadata()["steps"]) == 1
    with pytest.raises(ValueError, match=r"time_limit=-1.*accepted"):
        cfg_for(tmp_path, "x", time_limit=-1)


def test_temporal_init(tmp_path):
    zero = T.build_trainee(cfg_for(tmp_path, "z"))[0].model
    xav = T.build_trainee(cfg_for(tmp_path, "x", temporal_init="xavier"))[0].model
    for blk_z, blk_x in zip(zero.temporal_blocks, xav.temporal_blocks):
        for name in ("attn.proj", "cross_attn.proj", "mlp.fc2"):
            wz = blk_z.get_submodule(name).weight
            wx = blk_x.get_submodule(name).weight
            assert torch.count_nonzero(wz) == 0 and torch.count_nonzero(wx) == wx.numel()
    with pytest.raises(ValueError, match=r"temporal_init='ones'.*accepted"):
        cfg_for(tmp_path, "y", temporal_init="ones")


def test_caption_init(tmp_path):
    default = T.build_trainee(cfg_for(tmp_path, "d"))[0].model.y_embedder.y_proj
    xav = T.build_trainee(cfg_for(tmp_path, "x", caption_init="xavier"))[0].model.y_embedder.y_proj
    for name in ("fc1", "fc2"):
        wd, wx = getattr(default, name).weight, getattr(xav, name).weight
        bound = (6.0 / (wx.shape[0] + wx.shape[1])) ** 0.5  # xavier-uniform range
        assert abs(wd.std().item() - 0.02) < 0.005  # Open-Sora's init
        assert wx.abs().max() <= bound and wx.std() > 0.5 * bound / 3 ** 0.5
    with pytest.raises(ValueError, match=r"caption_init='zero'.*accepted"):
        cfg_for(tmp_path, "y", caption_init="zero")


def test_resume_refuses_other_settings(tmp_path):
    cfg = cfg_for(tmp_path, "r", steps=2)
    T.train(cfg, resume=False, progress=False)
    with pytest.raises(ValueError, match=r"\['lr'\].*saved: \[0.003\].*now: \[0.001\]"):
        T.train(cfg_for(tmp_path, "r", steps=4, lr=1e-3), progress=False)
    assert T.train(cfg_for(tmp_path, "r", steps=3, ckpt_every=1), progress=False)["step"] == 3


class _Payload:
    """Pickles as a call of open(marker, "w"): loading it runs code that creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_a_checkpoint_that_carries_code(tmp_path):
    out, marker = tmp_path / "evil", tmp_path / "marker"
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("".join(f"{k} = {v!r}\n" for k, v in dict(
        TINY, outputs=str(out), steps=2).items()))
    ckpt = out / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(dict(step=1, payload=_Payload(str(marker))), ckpt)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), str(cfg_file),
                        "--no-progress"], cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "last.pt" in r.stderr and "is refused" in r.stderr and "--no-resume" in r.stderr
    with pytest.raises(ValueError, match=r"is refused"):
        T.train(T.load_config(dict(TINY, outputs=str(out), steps=2)), progress=False)
    assert not marker.exists()
    torch.load(ckpt, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def test_global_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np
    np.random.seed(5)
    random.seed(5)
    torch.manual_seed(5)
    np.random.randn(3)  # odd count: numpy caches a Gaussian (has_gauss=1)
    random.gauss(0, 1)  # python caches gauss_next
    torch.save(T.global_rng_states(), tmp_path / "rng.pt")
    want = (np.random.randn(5), [random.gauss(0, 1) for _ in range(3)], torch.randn(4))
    np.random.seed(9)
    random.seed(9)
    torch.manual_seed(9)
    T.set_global_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (np.random.randn(5), [random.gauss(0, 1) for _ in range(3)], torch.randn(4))
    assert np.array_equal(want[0], got[0]) and want[1] == got[1]
    assert torch.equal(want[2], got[2])


def test_shipped_training_config_loads():
    cfg = T.load_config(os.path.join(ROOT, "configs", "demo", "train.py"))
    assert cfg["model"]["type"] and cfg["export_dtype"] in ("fp32", "fp16", "bf16")
