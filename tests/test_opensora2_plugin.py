"""The shipped Open-Sora 2.0 plugin config inside an upstream-shaped 2.0 run: a stand-in
``opensora`` package whose registry builds the upstream-shaped MMDiT double as ``flux`` with the
keyword arguments upstream's ``prepare_models`` passes, and a driver shaped as upstream's
``scripts/diffusion/inference.py`` + ``prepare_api`` + ``I2VDenoiser`` (keyword model calls,
timesteps in the model's dtype, the three guidance branches in one batch, oscillation). The
model dict is read from configs/opensora-v2/opensora_run/256px.py, with the sizes made small."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mmengine.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "opensora-v2", "opensora_run", "256px.py")

FAKE_REGISTRY = '''
from mmengine.registry import Registry
MODELS = Registry("model", locations=["opensora.models"])
'''
FAKE_MODELS = '''
# stands in for upstream Open-Sora 2.0: its registry's "flux" entry, built as upstream's is
import torch
from opensora.registry import MODELS
from upstream_mmdit import MMDiTConfig, MMDiTModel
SEEN = {}

@MODELS.register_module("flux")
def Flux(cache_dir=None, from_pretrained=None, device_map="cuda", torch_dtype=torch.bfloat16,
         strict_load=False, **kwargs):
    SEEN.update(kwargs, device_map=device_map, torch_dtype=torch_dtype)
    torch.manual_seed(0)
    model = MMDiTModel(MMDiTConfig(from_pretrained=from_pretrained, cache_dir=cache_dir,
                                   **kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(torch_dtype)
'''
DRIVER = '''
import sys, torch
from mmengine.config import Config
from upstream_mmdit import make_inputs, shard_mmdit
cfg = Config.fromfile(sys.argv[1])
from opensora.registry import MODELS
import opensora.models as om
dtype = getattr(torch, sys.argv[2])
# what upstream's prepare_models does
model = MODELS.build(dict(cfg.model, device_map="cpu", torch_dtype=dtype)).eval()
channel = cfg["model"]["in_channels"]   # as upstream's script reads it
if sys.argv[3] == "booster":            # what the booster does for sequence parallelism
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[4], rank=0,
                            world_size=1)
    shard_mmdit(model)
from opensora_duca.cache import get_cache_manager
mgr = get_cache_manager(model)
assert om.SEEN["device_map"] == "cpu" and om.SEEN["in_channels"] == channel == 8, om.SEEN
inp = make_inputs(model.config, grid=(2, 3, 4), batch=1, seed=3, dtype=dtype)
n = 1
text = dict(txt=torch.cat([inp["txt"], torch.zeros_like(inp["txt"]).repeat(2, 1, 1)]),
            txt_ids=inp["txt_ids"].repeat(3, 1, 1),
            y_vec=torch.cat([inp["y_vec"], torch.zeros_like(inp["y_vec"]).repeat(2, 1)]),
            img_ids=inp["img_ids"].repeat(3, 1, 1),
            cond=torch.cat([inp["cond"], inp["cond"], torch.zeros_like(inp["cond"])]))
steps = 12
ts = torch.linspace(1, 0, steps + 1)
ts = (6.0 * ts / (1 + 5.0 * ts)).tolist()   # a shifted schedule, dense near 1
img = inp["img"].repeat(3, 1, 1)
with torch.inference_mode():
    for i, (t, t_prev) in enumerate(zip(ts[:-1], ts[1:])):
        t_vec = torch.full((img.shape[0],), t, dtype=img.dtype)
        cond_x = img[: len(img) // 3]
        img = torch.cat([cond_x, cond_x, cond_x])
        pred = model(img=img, **text, timesteps=t_vec, guidance=None)
        text_gs = 7.5 if (i < 10 or i % 2 == 0) else 1.0
        image_gs = 3.0 if (i < 10 or i % 2 == 0) else 1.0
        c, u, u2 = pred.chunk(3, dim=0)
        pred = u2 + image_gs * (u - u2) + text_gs * (c - u)
        img = img + (t_prev - t) * torch.cat([pred, pred, pred])
s = mgr.stats()
print("LABELS", s["runs"], s["step_labels"], s["groups"])
torch.save(img[:1].float(), sys.argv[5])
'''


def _run(tmp_path, cache: str, dtype: str = "float32", booster: bool = False):
    """Write the stand-in package and a small copy of the shipped config; run the driver."""
    from dist_utils import free_port

    pkg = tmp_path / "opensora"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "registry.py").write_text(FAKE_REGISTRY)
    (pkg / "models.py").write_text(FAKE_MODELS)
    cfg = Config.fromfile(CONFIG, import_custom_modules=False)
    small = dict(cfg.model.model, from_pretrained=None, in_channels=8, vec_in_dim=12,
                 context_in_dim=10, hidden_size=32, num_heads=4, depth=2,
                 depth_single_blocks=2, axes_dim=[2, 2, 4], mlp_ratio=2.0)
    entry = dict(cfg.model, in_channels=8, model=small, cache=eval(cache))
    run_cfg = tmp_path / f"run_{len(list(tmp_path.iterdir()))}.py"
    run_cfg.write_text(f"custom_imports = {cfg.custom_imports!r}\nmodel = {entry!r}\n")
    drv = tmp_path / "drive.py"
    drv.write_text(DRIVER)
    out = tmp_path / f"out_{cache[:12].replace(' ', '')}_{dtype}_{booster}.pt"
    env = dict(os.environ, PYTHONPATH=":".join([str(tmp_path), os.path.join(ROOT, "tests")]
                                               + sys.path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(drv), str(run_cfg), dtype,
                        "booster" if booster else "plain", str(free_port()), str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("LABELS")][0]
    import torch
    return line, torch.load(out, weights_only=True)


def test_shipped_config_values_are_upstreams():
    cfg = Config.fromfile(CONFIG, import_custom_modules=False)
    assert cfg.model.type == "DuCa" and cfg.model.model.type == "flux"
    assert cfg.model.in_channels == cfg.model.model.in_channels == 64
    assert cfg.custom_imports["imports"] == ["opensora_duca.opensora_plugin"]
    big = Config.fromfile(CONFIG.replace("256px", "768px"), import_custom_modules=False)
    assert big.sampling_option.resolution == "768px" and big.sampling_option.num_steps == 50
    assert big.model.cache == dict(type="DuCa")


def test_plugin_config_runs_in_an_upstream_2_0_loop(tmp_path):
    """One run of 12 steps with DuCa's plan in fp32 and in bf16 (whose timesteps round equal
    near 1); the output differs from uncached but stays close; with the booster's processors
    and forward swapped in (one rank) the run is the same."""
    line, got = _run(tmp_path, 'dict(type="DuCa", warmup_steps=2)')
    assert line.startswith("LABELS 1 ") and "'conservative'" in line and "'aggressive'" in line
    _, ref = _run(tmp_path, 'dict(type="none")')
    err = float((got - ref).norm() / ref.norm())
    assert 0 < err < 0.2, err
    line16, _ = _run(tmp_path, 'dict(type="DuCa", warmup_steps=2)', dtype="bfloat16")
    assert line16.startswith("LABELS 1 ") and "'aggressive'" in line16, line16
    line_b, boosted = _run(tmp_path, 'dict(type="DuCa", warmup_steps=2)', booster=True)
    assert line_b == line
    assert float((boosted - got).norm() / got.norm()) < 1e-5


def test_wrapper_refuses_disagreeing_in_channels():
    from opensora_duca.registry import MODELS, build_module

    with pytest.raises(ValueError, match="in_channels=16 .* differs from the inner model's "
                                         "in_channels=64"):
        build_module(dict(type="DuCa", in_channels=16,
                          model=dict(type="MMDiT-cpu", in_channels=64)), MODELS)
