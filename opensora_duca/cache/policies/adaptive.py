"""Adaptive policies: TeaCache, First-Block Cache, MagCache, EasyCache and SpeCa decide at run
time whether to compute the trunk from block ``decide_at`` on or to reuse (SpeCa: forecast) that
part's stored residual. Each decision group (a clip: its rows of the CFG batch) keeps a small
run state (:meth:`AdaptivePolicy.new_state`) that ``decide`` reads and updates."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Tuple

from ...registry import CACHES
from ..calibrate import CalibrationFileError, load_calibration, load_mag_ratios
from ..plan import MEASURES, StepKind, StepPlan
from .base import CachePolicy
from .fields import (
    check_range,
    error,
    final_step_field,
    forecast_field,
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

    def label(self, computes: bool, change: Optional[float], state: AdaptiveState) -> str:
        """A group's decision in the statistics (``group_labels``)."""
        return StepKind.FULL if computes else StepKind.RESIDUAL

    def _forced(self, step: int, num_steps: Optional[int], change: Optional[float]) -> bool:
        last = num_steps is not None and step == num_steps - 1 and self.final_step == "full"
        return change is None or step < self.warmup_steps or last


class Accumulating:
    """TeaCache's and EasyCache's decision: each step adds its (rescaled) change to the
    group's sum; while the sum stays under ``threshold`` the rest of the trunk is skipped, when
    it reaches it the step is computed and the sum restarts (forced steps restart it too)."""

    def increment(self, change: float) -> float:
        """What a step's measured change adds to the sum (the change itself by default)."""
        return change

    def new_state(self) -> TeaCacheState:
        return TeaCacheState()

    def decide(self, step, num_steps, change, state: TeaCacheState) -> bool:
        if self._forced(step, num_steps, change):
            state.accumulated = 0.0
            return True
        state.accumulated += self.increment(change)
        if state.accumulated < self.threshold:
            return False
        state.accumulated = 0.0
        return True


@CACHES.register_module("TeaCache")
@dataclass(frozen=True)
class TeaCache(Accumulating, AdaptivePolicy):
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

    def increment(self, change: float) -> float:
        return self.rescale(change)


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





# ------------------------------------------------------------------------------ MagCache
#: MagCache's curve without a calibration: measured on the demo model (configs/demo, 30 steps)
#: by ``tools/calibrate.py configs/demo/inference.py --policy MagCache --seeds 100`` (the
#: config's four prompts), rounded
DEMO_MAG_RATIOS = (1.0, 1.0007, 0.9738, 0.9664, 0.9629, 0.9692, 0.9663, 0.9631, 0.9668, 0.9541,
                   0.9623, 0.954, 0.9687, 0.9621, 0.9565, 0.9559, 0.9704, 0.9658, 0.9618, 0.9757,
                   0.9693, 0.981, 0.9791, 0.9939, 1.0011, 1.0088, 1.0061, 1.0097, 1.0288, 1.0282)


@dataclass
class MagCacheState(AdaptiveState):
    """MagCache: since the group's last computed step, the product of the curve's ratios, the
    accumulated error and the steps skipped."""

    ratio: float = 1.0
    error: float = 0.0
    skipped: int = 0


@CACHES.register_module("MagCache")
@dataclass(frozen=True)
class MagCache(AdaptivePolicy):
    """MagCache (Ma et al. 2025): the ratio of the magnitudes of successive residuals of the
    trunk (mean over tokens of ``||r_t|| / ||r_(t-1)||``, r = trunk output minus input) follows
    one smooth curve across prompts, so it is calibrated once (``tools/calibrate.py --policy
    MagCache`` on one uncached run) and the decisions need no measurement. After the first
    ``retention_ratio`` of the steps (always computed), each step multiplies the running ratio
    by the curve's value, adds ``|1 - running ratio|`` to the accumulated error and counts a
    skip; while the error stays under ``threshold`` and at most ``max_skips`` steps in a row
    are skipped, the trunk is skipped and its stored residual added; otherwise the step is
    computed and the three restart.

    Args:
        threshold: accumulated error bound (0.12); max_skips: consecutive skips K (2);
        retention_ratio: share of the first steps always computed (0.2, at least one step);
        calibration: the JSON of ``tools/calibrate.py --policy MagCache`` (``mag_ratios``), or
        ``mag_ratios`` given directly (step 0 first). Neither: :data:`DEMO_MAG_RATIOS`, the
        curve measured on this project's demo model (30 rflow steps, cfg 4.0; seed 100, the demo
        config's four prompts), a stand-in for any other model, where the curve is the
        model's own: calibrate it. A run with another number of steps reads the curve
        linearly interpolated at ``step / (num_steps - 1)`` of its length.
        final_step: "full" computes the last step (default) or "plan"; stored_dtype.

    The decisions depend on the step index only: the same for every clip and rank, no
    collective, and the two CFG halves never need each other (CFG parallelism works)."""

    name: ClassVar[str] = "MagCache"
    measure: ClassVar[str] = "none"
    threshold: float = number_field(0.12)
    max_skips: int = int_field(2, lo=1)
    retention_ratio: float = number_field(0.2, lo=0.0, hi=1.0)
    calibration: Optional[str] = None
    mag_ratios: Optional[Tuple[float, ...]] = None
    final_step: str = final_step_field("full")
    stored_dtype: Optional[str] = stored_dtype_field()

    @property
    def couples_cfg_halves(self) -> bool:
        return False  # the decisions read the step index only

    def _check_together(self):
        n, ratios = self.name, self.mag_ratios
        if self.calibration is not None:
            try:
                loaded = load_mag_ratios(self.calibration)
            except CalibrationFileError as err:
                raise error(n, "calibration", err.path, err.accepted) from err
            if ratios is not None and tuple(ratios) != loaded:
                raise error(n, "mag_ratios", ratios, "None when 'calibration' is set")
            ratios = loaded
        elif ratios is None:
            ratios = DEMO_MAG_RATIOS
        elif not isinstance(ratios, (list, tuple)) or len(ratios) < 2 or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r)
                and r > 0 for r in ratios):
            raise error(n, "mag_ratios", ratios, "a list of at least 2 finite positive numbers")
        object.__setattr__(self, "mag_ratios", tuple(float(r) for r in ratios))

    def retained(self, num_steps: Optional[int]) -> int:
        """Steps computed at the start of a run of ``num_steps``."""
        total = len(self.mag_ratios) if num_steps is None else num_steps
        return max(1, int(self.retention_ratio * total))

    def curve(self, step: int, num_steps: Optional[int]) -> float:
        """The calibrated ratio at ``step`` (interpolated for another number of steps)."""
        r = self.mag_ratios
        if num_steps is None or num_steps == len(r):
            return r[min(step, len(r) - 1)]
        pos = step / max(num_steps - 1, 1) * (len(r) - 1)
        lo = min(int(math.floor(pos)), len(r) - 2)
        return r[lo] + (pos - lo) * (r[lo + 1] - r[lo])

    def new_state(self) -> MagCacheState:
        return MagCacheState()

    def decide(self, step, num_steps, change, state: MagCacheState) -> bool:
        last = num_steps is not None and step == num_steps - 1 and self.final_step == "full"
        if step < self.retained(num_steps) or last:
            state.ratio, state.error, state.skipped = 1.0, 0.0, 0
            return True
        state.ratio *= self.curve(step, num_steps)
        state.error += abs(1.0 - state.ratio)
        state.skipped += 1
        if state.error < self.threshold and state.skipped <= self.max_skips:
            return False
        state.ratio, state.error, state.skipped = 1.0, 0.0, 0
        return True


# ------------------------------------------------------------------------------ EasyCache
@CACHES.register_module("EasyCache")
@dataclass(frozen=True)
class EasyCache(Accumulating, AdaptivePolicy):
    """EasyCache (Zhou et al. 2025), online, no calibration: at every computed step the
    transformation rate ``k = sum |out_c - out_c'| / sum |x_c - x_c'|`` between the clip's last
    two computed steps c' < c is kept (x: the trunk input, out: the trunk output's last N
    tokens, N the input's, i.e. the image tokens of an MMDiT's joint state; sums over the
    clip's rows of the global token grid). At a later step t the output's relative change is
    predicted as ``k * sum |x_t - x_(t-1)| / sum |out_c|`` and accumulated; while the sum stays
    under ``threshold`` the trunk is skipped and the stored residual (output minus input at c)
    added; when it reaches the threshold the step is computed and the sum restarts. A clip
    without a rate yet (fewer than two computed steps) computes.

    Args: threshold (0.05), warmup_steps (3, always computed), final_step ("full" | "plan"),
    stored_dtype. The step's input change and the stored sums travel in one all_gather."""

    name: ClassVar[str] = "EasyCache"
    measure: ClassVar[str] = "trunk_input"
    threshold: float = number_field(0.05)
    warmup_steps: int = int_field(3)
    final_step: str = final_step_field("full")
    stored_dtype: Optional[str] = stored_dtype_field()



# ------------------------------------------------------------------------------ SpeCa
@dataclass
class SpeCaState(AdaptiveState):
    """SpeCa: forecast steps in a row since the clip's last computed step."""

    drafts: int = 0
    rejected: bool = False


@CACHES.register_module("SpeCa")
@dataclass(frozen=True)
class SpeCa(AdaptivePolicy):
    """A verified forecast (after SpeCa, Liu et al. 2025): each clip's residual of the trunk
    after its first blocks (the first spatial + temporal pair; an MMDiT's first double block)
    is forecast from the clip's computed steps (``forecast``: Taylor of order 0-2 or bdf2, as
    the forecasting policies', in the step index), and every forecast step is checked first:
    the first blocks always run, and their residual (what they added to the trunk input) is
    compared with its own forecast from the same steps, relative L1 ``sum |forecast - exact| /
    sum |exact|`` over the clip's rows (one all_gather). Under ``threshold`` the draft is
    accepted (the rest of the trunk is skipped, its forecast residual added); otherwise, or
    after ``max_drafts`` accepted drafts in a row, the clip computes the step. Statistics:
    ``group_labels`` says "forecast (verified)" / "full (forecast rejected)" per clip and step,
    and ``stats()["verify"]`` counts the checks and how many failed (``checked``: the accepted
    and the rejected drafts; a step computed because ``max_drafts`` was reached passed its
    check and is labelled "full", not counted).

    Args: threshold (0.15), max_drafts (5), forecast (dict(order=1); bdf2 accepted),
    warmup_steps (3), final_step ("full" | "plan"), stored_dtype."""

    name: ClassVar[str] = "SpeCa"
    measure: ClassVar[str] = "first_pair_forecast"
    decide_at: ClassVar[int] = 2
    verifies: ClassVar[bool] = True
    threshold: float = number_field(0.15)
    max_drafts: int = int_field(5, lo=1)
    forecast: Mapping[str, Any] = forecast_field()
    warmup_steps: int = int_field(3)
    final_step: str = final_step_field("full")
    stored_dtype: Optional[str] = stored_dtype_field()

    def _check_together(self):
        if self.forecast["distance"] != "step":
            raise error(self.name, "forecast.distance", self.forecast["distance"],
                        "'step' (the drafts are forecast in the step index)")

    def new_state(self) -> SpeCaState:
        return SpeCaState()

    def decide(self, step, num_steps, change, state: SpeCaState) -> bool:
        state.rejected = False
        if self._forced(step, num_steps, change):
            state.drafts = 0
            return True
        if change >= self.threshold:
            state.drafts, state.rejected = 0, True
            return True
        if state.drafts >= self.max_drafts:
            state.drafts = 0
            return True
        state.drafts += 1
        return False

    def label(self, computes, change, state: SpeCaState) -> str:
        if state.rejected:
            return StepKind.REJECTED
        return StepKind.FULL if computes else StepKind.VERIFIED


__all__ = ["AdaptivePolicy", "AdaptiveState", "TeaCacheState", "TeaCache", "FirstBlockCache",
           "MagCache", "MagCacheState", "DEMO_MAG_RATIOS", "EasyCache", "SpeCa", "SpeCaState"]
