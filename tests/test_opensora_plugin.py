"""Activation by config: our registry's DuCa wrapper, and the Open-Sora plugin imported through
mmengine's custom_imports into a (stand-in) Open-Sora package's registry."""
from __future__ import annotations

import subprocess
import sys

from opensora_duca.cache import get_cache_manager
from opensora_duca.registry import MODELS, build_module


def test_own_registry_wrapper_returns_patched_inner_model():
    m = build_module(dict(type="DuCa", model=dict(type="STDiT3-S/2", depth=1, hidden_size=64,
                                                  num_heads=4),
                          cache=dict(type="DuCa", scorer="random")), MODELS,
                     caption_channels=32, model_max_length=8)
    assert type(m).__name__ == "STDiT3" and m.caption_channels == 32
    assert get_cache_manager(m).policy.scorer == "random"
    assert hasattr(m, "y_embedder")


def test_plugin_without_opensora_says_so(tmp_path):
    code = "import opensora_duca.opensora_plugin"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": ":".join(sys.path)})
    assert r.returncode != 0
    assert "needs Open-Sora installed" in r.stderr


FAKE_REGISTRY = '''
from mmengine.registry import Registry
MODELS = Registry("model", locations=["opensora.models"])
'''
FAKE_MODELS = '''
# stands in for upstream Open-Sora: its own registry and an STDiT3 entry built with the
# keyword arguments its inference script passes
from opensora.registry import MODELS
from opensora_duca.models.stdit3 import STDiT3
SEEN = {}

@MODELS.register_module("STDiT3-XL/2")
def STDiT3_XL_2(from_pretrained=None, **kwargs):
    SEEN.update(kwargs)
    return STDiT3(depth=1, hidden_size=64, num_heads=4, **kwargs)
'''
RUN_CONFIG = '''
custom_imports = dict(imports=["opensora_duca.opensora_plugin"], allow_failed_imports=False)
model = dict(type="DuCa", model=dict(type="STDiT3-XL/2", qk_norm=True),
             cache=dict(type="DuCa", warmup_steps=1))
'''
DRIVER = '''
import torch
from mmengine.config import Config
cfg = Config.fromfile("{cfg}")
from opensora.registry import MODELS
import opensora.models as om
# what Open-Sora's scripts/inference.py does
model = MODELS.build(dict(cfg.model, input_size=(2, 8, 10), in_channels=4, caption_channels=32,
                          model_max_length=8, enable_sequence_parallelism=False))
from opensora_duca.cache import get_cache_manager
mgr = get_cache_manager(model)
assert om.SEEN["in_channels"] == 4 and om.SEEN["caption_channels"] == 32, om.SEEN
x = torch.randn(2, 4, 2, 8, 10); y = torch.randn(2, 1, 8, 32)
with torch.no_grad():
    for i in range(3):
        model(x, torch.full((2,), 900.0 - 100 * i), y)
print("LABELS", mgr.stats()["step_labels"], type(model).__name__, hasattr(model, "y_embedder"))
'''


def test_plugin_registers_into_opensora_registry(tmp_path):
    pkg = tmp_path / "opensora"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "registry.py").write_text(FAKE_REGISTRY)
    (pkg / "models.py").write_text(FAKE_MODELS)
    cfg = tmp_path / "cfg.py"
    cfg.write_text(RUN_CONFIG)
    drv = tmp_path / "drive.py"
    drv.write_text(DRIVER.format(cfg=cfg))
    env = {"PYTHONPATH": ":".join([str(tmp_path)] + sys.path)}
    r = subprocess.run([sys.executable, str(drv)], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "LABELS ['full', 'conservative', 'aggressive'] STDiT3 True" in r.stdout
