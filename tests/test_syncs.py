"""Host-device synchronisations of a run (counted on the CPU as the calls that synchronise on a
device): a DuCa run inside a session given the sampler's host timesteps makes none; without
them the cache reads each step's timestep from the device. The counter itself counts reads and
restores torch afterwards."""
from __future__ import annotations

import torch
from cache_utils import inputs, small_model

from opensora_duca.bench.syncs import SyncCounter
from opensora_duca.cache import apply_cache, remove_cache
from opensora_duca.schedulers.rflow import RFlow


def _syncs(policy, host_timesteps: bool) -> tuple[int, list]:
    model = small_model(depth=2, hidden=32)
    x, y, mask = inputs()
    sched = RFlow(num_sampling_steps=8, cfg_scale=4.0)
    z = x[:1]
    mgr = apply_cache(model, policy)
    ts = sched.timesteps().tolist() if host_timesteps else None
    try:
        with mgr.session(8, timesteps=ts), SyncCounter("cpu") as counter, torch.no_grad():
            sched.sample(model, z, y[:1], y[1:], mask=mask[:1], progress=False,
                         additional_args=dict(height=torch.tensor([64.0]),
                                              width=torch.tensor([80.0]),
                                              fps=torch.tensor([24.0])))
        labels = mgr.stats()["step_labels"]
    finally:
        remove_cache(model)
    return counter.count, labels


def test_duca_run_with_host_timesteps_makes_no_sync():
    n, labels = _syncs(dict(type="DuCa"), host_timesteps=True)
    assert {"conservative", "aggressive"} <= set(labels)
    assert n == 0


def test_without_host_timesteps_each_step_reads_its_timestep():
    n, labels = _syncs(dict(type="DuCa"), host_timesteps=False)
    assert n == len(labels) == 8


def test_counter_counts_reads_and_restores_torch():
    t = torch.tensor([1.5, 0.0])
    before = (torch.Tensor.__dict__.get("__float__"), torch.equal)
    with SyncCounter("cpu") as c:
        float(t[0])
        bool(t[1])
        t.tolist()
        torch.equal(t, t)
        t.nonzero()
    assert c.count == 5
    assert (torch.Tensor.__dict__.get("__float__"), torch.equal) == before
    with SyncCounter("cpu") as c:
        pass
    assert c.count == 0
