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
    with pytest.raises(RuntimeError, match="other captions"):
        with mgr.session(num_steps=10), torch.no_grad():
            m(x, torch.full((2,), 900.0), y, mask=mask)
            m(x, torch.full((2,), 900.0), y[[1, 0]], mask=mask)
    assert mgr.stats()["stored_bytes"] == 0
    with pytest.raises(RuntimeError, match="timestep 950, not below the previous step's 900"):
        with mgr.session(num_steps=10), torch.no_grad():
            m(x, torch.full((2,), 900.0), y, mask=mask)
            m(x, torch.full((2,), 950.0), y, mask=mask)
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


# --------------------------------------------------- issue 21: bf16 runs, the session contract
@torch.no_grad()
def _euler_dense(model, x, y, mask, n, dtype):
    """A bf16 Euler loop over a dense schedule near 1000 whose timesteps round to equal bf16
    values (as upstream's shifted 720p schedules at 50 steps)."""
    ts = torch.tensor([1000.0 - 0.9 * i for i in range(n)]).to(dtype)
    for i in range(n):
        out = model(x, ts[i].expand(x.shape[0]), y, mask=mask)
        x = (x.float() + out[:, :4].float() * 0.02).to(dtype)
    return ts


def test_bf16_sessionless_run_is_one_run_despite_rounding():
    """Equal bf16 timesteps and the latents' bf16 rounding are the sampler's: one run."""
    m = small_model(depth=1).to(torch.bfloat16)
    x, y, mask = inputs()
    mgr = apply_cache(m, dict(type="FORA", interval=3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ts = _euler_dense(m, x.bfloat16(), y.bfloat16(), mask, 12, torch.bfloat16)
    assert len(set(ts.tolist())) < 12  # the schedule does repeat timesteps in bf16
    assert mgr.runs == 1, [str(w.message) for w in caught]
    assert not [w for w in caught if "new run" in str(w.message)]
    assert mgr.stats()["step_labels"].count("reuse") >= 6


def test_bf16_session_accepts_repeated_host_timesteps():
    m = small_model(depth=1).to(torch.bfloat16)
    x, y, mask = inputs()
    mgr = apply_cache(m, dict(type="FORA", interval=2))
    ts = [float(t) for t in torch.tensor([1000.0, 999.5, 999.0, 998.0]).bfloat16()]
    assert ts[0] == ts[1]
    with mgr.session(num_steps=4, timesteps=ts), torch.no_grad():
        for t in ts:
            m(x.bfloat16(), torch.full((2,), t).bfloat16(), y.bfloat16(), mask=mask)
    assert mgr.runs == 1 and mgr.stats()["step_labels"].count("reuse") == 2


def test_session_contract_nested_and_overrun_are_errors():
    m = small_model(depth=1)
    x, y, mask = inputs()
    mgr = apply_cache(m, dict(type="FORA", interval=2))
    with mgr.session(num_steps=2):
        with pytest.raises(RuntimeError, match="already open"):
            with mgr.session(num_steps=2):
                pass
        with torch.no_grad():  # the outer session is intact
            m(x, torch.full((2,), 900.0), y, mask=mask)
            m(x, torch.full((2,), 800.0), y, mask=mask)
            with pytest.raises(RuntimeError, match=r"session\(num_steps=2\) is over"):
                m(x, torch.full((2,), 700.0), y, mask=mask)
    assert mgr.runs == 1


def test_frozen_parameters_with_an_input_requiring_grad_are_refused():
    m = small_model(depth=1).requires_grad_(False)
    x, y, mask = inputs()
    apply_cache(m, dict(type="DuCa"))
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        m(x.requires_grad_(), torch.full((2,), 900.0), y, mask=mask)


def test_a_second_thread_is_refused_while_a_run_is_open():
    """Two threads on one cached model: the second gets a clear error instead of a mixed run,
    and the first thread's run is unaffected (equal to running it alone)."""
    import threading

    m = small_model(depth=1)
    x, y, mask = inputs()
    mgr = apply_cache(m, dict(type="FORA", interval=2))

    def run():
        with mgr.session(num_steps=3), torch.no_grad():
            outs = []
            for t in (900.0, 800.0, 700.0):
                outs.append(m(x, torch.full((2,), t), y, mask=mask))
                if t == 900.0:
                    opened.set()
                    proceed.wait(10)
            return outs

    opened, proceed = threading.Event(), threading.Event()
    errors, result = [], {}
    first = threading.Thread(target=lambda: result.setdefault("a", run()))
    first.start()
    opened.wait(10)
    for call in (lambda: m(x, torch.full((2,), 900.0), y, mask=mask),
                 lambda: mgr.session(num_steps=3).__enter__()):
        try:
            with torch.no_grad():
                call()
        except RuntimeError as err:
            errors.append(str(err))
    proceed.set()
    first.join(30)
    assert len(errors) == 2 and all("second thread" in e for e in errors)
    opened.clear()
    proceed.set()
    alone = run()
    assert all(torch.equal(a, b) for a, b in zip(result["a"], alone))
    with mgr.session(num_steps=1), torch.no_grad():  # released: usable again from this thread
        m(x, torch.full((2,), 900.0), y, mask=mask)
