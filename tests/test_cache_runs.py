"""Run boundaries the manager must get right when driven from Python, the autograd guard, and
ownership (no reference cycle through the model)."""
from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from cache_utils import inputs, small_model

from opensora_duca.cache import apply_cache, get_cache_manager, remove_cache


@torch.no_grad()
def euler(model, x, y, mask, timesteps):
    """A CFG-free Euler sampler: x moves along the model output (first 4 channels)."""
    outs = []
    for i, t in enumerate(timesteps):
        out = model(x, torch.full((x.shape[0],), float(t)), y, mask=mask)
        outs.append(out)
        nxt = timesteps[i + 1] if i + 1 < len(timesteps) else 0.0
        x = x + out[:, :4] * (float(t) - nxt) / 1000.0
    return outs


def test_sessionless_partial_run_then_lower_start_is_a_new_run():
    """Run A denoises 1000 -> 550 (stops early); run B (SDEdit-like) starts at 400 < 550 with a
    new input. B must not reuse A's features: its outputs equal B on a fresh manager."""
    m = small_model()
    xa, ya, ma = inputs(seed=1)
    xb, yb, mb = inputs(seed=2)
    ts_a = [1000 - 50 * i for i in range(10)]
    ts_b = [400 - 40 * i for i in range(8)]
    mgr = apply_cache(m, dict(type="DuCa", warmup_steps=1))
    euler(m, xa, ya, ma, ts_a)
    b_after_a = euler(m, xb, yb, mb, ts_b)
    assert mgr.runs == 2 and mgr.stats()["step_labels"][10] == "full"
    remove_cache(m)
    mgr = apply_cache(m, dict(type="DuCa", warmup_steps=1))
    b_fresh = euler(m, xb, yb, mb, ts_b)
    assert mgr.runs == 1
    assert all(torch.equal(a, b) for a, b in zip(b_after_a, b_fresh))
    # and a sessionless Euler run is one run: the continuation test accepts every step
    assert mgr.stats()["step_labels"].count("aggressive") > 0


def test_session_rejects_a_timestep_that_does_not_decrease():
    """Two calls per step inside a session (conditional and unconditional passed separately)
    would share one cache: a clear error instead."""
    m = small_model()
    x, y, mask = inputs()
    mgr = apply_cache(m, dict(type="DuCa"))
    with pytest.raises(RuntimeError, match="not below the previous step"):
        with mgr.session(num_steps=10), torch.no_grad():
            m(x, torch.full((2,), 900.0), y, mask=mask)
            m(x, torch.full((2,), 900.0), y[[1, 0]], mask=mask)
    assert mgr.stats()["stored_bytes"] == 0
    with pytest.raises(RuntimeError, match="other captions"):
        with mgr.session(num_steps=10), torch.no_grad():
            m(x, torch.full((2,), 900.0), y, mask=mask)
            m(x, torch.full((2,), 800.0), y[[1, 0]], mask=mask)


def test_sessionless_two_calls_per_step_warn_and_do_not_mix():
    m = small_model()
    x, y, mask = inputs()
    with torch.no_grad():
        ref = [m(x, torch.full((2,), t), yy, mask=mask) for t in (900.0, 800.0)
               for yy in (y, y[[1, 0]])]
    apply_cache(m, dict(type="FORA", interval=2))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outs = [m(x, torch.full((2,), t), yy, mask=mask) for t in (900.0, 800.0)
                for yy in (y, y[[1, 0]])]
    assert any("same timestep" in str(w.message) for w in caught)
    assert all(torch.equal(a, b) for a, b in zip(outs, ref))


def test_cached_run_under_autograd_is_a_clear_error():
    m = small_model()
    x, y, mask = inputs()
    apply_cache(m, dict(type="DuCa"))
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        m(x, torch.full((2,), 900.0), y, mask=mask)
    remove_cache(m)
    apply_cache(m, dict(type="none"))  # nothing stored: gradients are fine
    m(x, torch.full((2,), 900.0), y, mask=mask).sum().backward()


def test_model_with_cache_is_freed_without_the_cyclic_collector():
    gc.collect()
    gc.disable()
    try:
        m = small_model(depth=1)
        x, y, mask = inputs()
        mgr = apply_cache(m, dict(type="DuCa", warmup_steps=1))
        with mgr.session(num_steps=3), torch.no_grad():
            for t in (900.0, 800.0, 700.0):
                m(x, torch.full((2,), t), y, mask=mask)
        model_ref, mgr_ref = weakref.ref(m), weakref.ref(mgr)
        del m, mgr
        assert model_ref() is None and mgr_ref() is None
        m2 = small_model(depth=1)
        apply_cache(m2, dict(type="ToCa"))
        mgr2 = weakref.ref(get_cache_manager(m2))
        remove_cache(m2)
        assert mgr2() is None  # removing the manager frees it at once
    finally:
        gc.enable()
