"""Adaptive policies: TeaCache and First-Block Cache decide at run time, from a measured relative
change, whether to compute the trunk from block ``decide_at`` on or to reuse that part's stored
residual. Each decision group (a clip: its rows of the CFG batch) keeps a small run state
(:meth:`AdaptivePolicy.new_state`) that ``decide`` reads and updates."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

from ...registry import CACHES
from ..calibrate import CalibrationFileError, load_calibration
from ..plan import MEASURES, StepKind, StepPlan
from .base import CachePolicy
from .fields import (
    check_range,
    error,
    final_step_field,
    int_field,
    number_field,
    stored_dtype_field,
)


@dataclass
class AdaptiveState:
    """The run state of one decision group (none for First-Block Cache: its reference, the
    measured input of the last computed step, is kept by the cache manager)."""


@dataclass
class TeaCacheState(AdaptiveState):
    """TeaCache: the rescaled change accumulated since the group's last computed step."""

    accumulated: float = 0.0


class AdaptivePolicy(CachePolicy):
    """Base of the policies that decide at run time, from a measured relative change, whether
    to compute the trunk from block ``decide_at`` on or to reuse that part's stored residual.

    ``measure`` names what is compared between steps: ``"modulated_input"`` (block 0's
    timestep-modulated, normalised input) or ``"first_pair_residual"`` (what the first spatial
    and temporal blocks add to the trunk input). ``reference_every_step``: the measure compares
    with the previous step (True) or with the last step that computed the trunk (False). The
    run state of each decision group is the object :meth:`new_state` returns; the cache
    manager keeps one per group and run and passes it to :meth:`decide`."""

    measure: ClassVar[str] = "modulated_input"
    decide_at: ClassVar[int] = 0
    reference_every_step: ClassVar[bool] = True

    def __post_init__(self):
        if self.measure not in MEASURES:  # a class attribute: checked whenever one is built
            raise error(self.name, "measure", self.measure, f"one of {list(MEASURES)}")
        super().__post_init__()

    @property
    def couples_cfg_halves(self) -> bool:
        return True  # a clip's CFG pair decides together, from a change summed over both halves

    def plan(self, step, num_steps, timesteps):
        return StepPlan(decide_at=self.decide_at, label=StepKind.FULL)

    def skips_trunk(self):
        return True

    def skips_trunk_at(self, step, num_steps, timesteps=()):
        return False  # decided at run time; the residual, not the output, is stored

    def new_state(self) -> AdaptiveState:
        """A decision group's state at the start of a run."""
        return AdaptiveState()

    def decide(self, step: int, num_steps: Optional[int], change: Optional[float],
               state: AdaptiveState) -> bool:
        """True: compute the trunk from ``decide_at`` on. ``change`` is None when there is no
        reference yet (the run's first step); ``state`` is the group's :meth:`new_state`."""
        raise NotImplementedError

    def _forced(self, step: int, num_steps: Optional[int], change: Optional[float]) -> bool:
        last = num_steps is not None and step == num_steps - 1 and self.final_step == "full"
        return change is None or step < self.warmup_steps or last


@CACHES.register_module("TeaCache")
@dataclass(frozen=True)
class TeaCache(AdaptivePolicy):
    """TeaCache (Liu et al. 2024): the relative L1 change of the first block's
    timestep-modulated input from the previous step, rescaled by a polynomial fitted on the
    model in use, is accumulated over steps; while the sum stays under ``threshold`` the trunk
    is skipped and its stored residual (output minus input at the last computed step) added to
    the input; when it reaches the threshold the trunk is computed and the sum restarts.

    Args:
        threshold: accumulated rescaled change that forces a computation (0.1).
        calibration: path of the JSON that ``tools/calibrate.py`` writes (its ``coefficients``,
            highest degree first, and the measured input range ``x_range``); or
            ``coefficients`` (and optionally ``input_range``) given directly; neither: the raw
            change (the identity polynomial). The polynomial is evaluated with its input
            clamped to the calibrated range (a fitted polynomial is meaningless outside it) and
            its output clamped at 0 (a change is never negative).
        warmup_steps: steps always computed at the start (1); final_step: "full" computes
            the last step (as TeaCache does) or "plan".
        stored_dtype: None | fp32 | fp16 | bf16 | fp8 for the stored residual.
    """

    name: ClassVar[str] = "TeaCache"
    threshold: float = number_field(0.1)
    calibration: Optional[str] = None          # these three: checked together
    coefficients: Optional[Tuple[float, ...]] = None
    input_range: Optional[Tuple[float, float]] = None
    warmup_steps: int = int_field(1)
    final_step: str = final_step_field("full")
    stored_dtype: Optional[str] = stored_dtype_field()

    def _check_together(self):
        n = self.name
        coeffs, rng = self.coefficients, self.input_range
        if self.calibration is not None:
            try:
                loaded, loaded_rng = load_calibration(self.calibration)
            except CalibrationFileError as err:
                raise error(n, "calibration", err.path, err.accepted) from err
            for key, given, want in (("coefficients", coeffs, loaded),
                                     ("input_range", rng, loaded_rng)):
                if given is not None and tuple(given) != want:  # describe() gives all three
                    raise error(n, key, given, "None when 'calibration' is set")
            coeffs, rng = loaded, loaded_rng
        elif coeffs is not None:
            if not isinstance(coeffs, (list, tuple)) or not coeffs:
                raise error(n, "coefficients", coeffs, "a non-empty list of numbers")
            for c in coeffs:  # finite numbers (NaN / Inf would never skip, or always)
                if isinstance(c, bool) or not isinstance(c, (int, float)) \
                        or not math.isfinite(c):
                    raise error(n, "coefficients", coeffs, "a non-empty list of finite numbers")
            coeffs = tuple(float(c) for c in coeffs)
        if rng is not None:
            rng = check_range(n, "input_range", rng, strict=False)
        object.__setattr__(self, "coefficients", coeffs)
        object.__setattr__(self, "input_range", rng)

    def rescale(self, change: float) -> float:
        if self.coefficients is None:
            return change
        if self.input_range is not None:
            change = min(max(change, self.input_range[0]), self.input_range[1])
        out = 0.0
        for c in self.coefficients:  # Horner, highest degree first
            out = out * change + c
        return max(out, 0.0)

    def new_state(self) -> TeaCacheState:
        return TeaCacheState()

    def decide(self, step, num_steps, change, state: TeaCacheState) -> bool:
        if self._forced(step, num_steps, change):
            state.accumulated = 0.0
            return True
        state.accumulated += self.rescale(change)
        if state.accumulated < self.threshold:
            return False
        state.accumulated = 0.0
        return True


@CACHES.register_module("FirstBlockCache")
@dataclass(frozen=True)
class FirstBlockCache(AdaptivePolicy):
    """First-Block Cache (ParaAttention, diffusers): the first spatial and temporal blocks are
    always computed; while what they add to the trunk input changes, relative to the last step
    that computed the whole trunk, by less than ``threshold`` (relative L1), the other blocks
    are skipped and their stored residual is added.

    Args: threshold (0.05), warmup_steps (1), final_step ("plan" | "full"), stored_dtype."""

    name: ClassVar[str] = "FirstBlockCache"
    measure: ClassVar[str] = "first_pair_residual"
    decide_at: ClassVar[int] = 2
    reference_every_step: ClassVar[bool] = False
    threshold: float = number_field(0.05)
    warmup_steps: int = int_field(1)
    final_step: str = final_step_field("plan")
    stored_dtype: Optional[str] = stored_dtype_field()

    def decide(self, step, num_steps, change, state: AdaptiveState) -> bool:
        return self._forced(step, num_steps, change) or change >= self.threshold


__all__ = ["AdaptivePolicy", "AdaptiveState", "TeaCacheState", "TeaCache", "FirstBlockCache"]
