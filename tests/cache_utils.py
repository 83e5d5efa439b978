"""Small models and a denoising-loop driver shared by the cache tests."""
from __future__ import annotations

import torch

from opensora_duca.cache.plan import FULL_STEP, KINDS, Action, StepPlan
from opensora_duca.cache.policies import CachePolicy
from opensora_duca.registry import MODELS, build_module


class Scripted(CachePolicy):
    """A test policy: step -> plan from a dict (default full); reuses everything."""

    name = "scripted"

    def __init__(self, plans, scorer="random"):
        self.plans, self.scorer = plans, scorer

    def plan(self, step, num_steps, timesteps):
        return self.plans.get(step, FULL_STEP)

    def reuses(self, kind):
        return True


def plan_of(**actions):
    """A StepPlan: every kind FULL unless given as an Action or an (Action, ratio) pair."""
    acts, ratios = {k: Action.FULL for k in KINDS}, {}
    for k, v in actions.items():
        if isinstance(v, tuple):
            acts[k], ratios[k] = v
        else:
            acts[k] = v
    return StepPlan(actions=acts, ratios=ratios, label="test")


def small_model(seed: int = 0, depth: int = 2, hidden: int = 64, heads: int = 4, **kw):
    """A random small STDiT3 whose temporal blocks are not zero-initialised (so every module
    matters), in eval mode."""
    torch.manual_seed(seed)
    m = build_module(dict(type="STDiT3-S/2", depth=depth, hidden_size=hidden, num_heads=heads,
                          caption_channels=32, model_max_length=8, **kw), MODELS).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def inputs(batch: int = 2, frames: int = 3, h: int = 8, w: int = 10, seed: int = 0, cin: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, frames, h, w, generator=g)
    y = torch.randn(batch, 1, 8, 32, generator=g)
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[0, 5:] = 0
    return x, y, mask


@torch.no_grad()
def trajectory(model, x, y, mask, steps: int = 10, x_mask=None, **kw):
    """Model outputs of an Euler-like loop whose inputs do not depend on the outputs, so a
    cached and an uncached run see the same inputs at every step."""
    outs = []
    for i in range(steps):
        t = torch.full((x.shape[0],), 1000.0 * (1 - i / steps))
        xi = x * (1 - i / (2 * steps))
        outs.append(model(xi, t, y, mask=mask, x_mask=x_mask, **kw))
    return outs
