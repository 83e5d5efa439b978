"""Validation of policy settings, declared once per field.

Each checked field of a policy dataclass carries its check in ``field(metadata={"check": ...})``
(made by the helpers below: :func:`int_field`, :func:`number_field`, :func:`choice_field`, ...);
:func:`validate_fields`, called by the base ``__post_init__`` of every policy, runs the checks in
field order and stores what they return (the normalised value: a float, an enum member, a dict
with its defaults filled in). A check is ``check(policy, key, value) -> value``; it reads the
policy's name for its message and may read the fields declared before its own (already
checked). Every error names the policy, the key, the value and what is accepted.
"""
from __future__ import annotations

import dataclasses
import math
from enum import Enum
from typing import Any, Callable, Mapping

from ..plan import Kind

STORED_DTYPES = (None, "fp32", "fp16", "bf16", "fp8", "int8")
DISTANCES = ("step", "timestep")
FINAL_STEPS = ("plan", "full")
MAX_ORDER = 2
FORECAST_METHODS = ("taylor", "bdf2")
CORRECTORS = (None, "heun")

Check = Callable[[Any, str, Any], Any]


# ------------------------------------------------------------------ the checks
def error(policy: str, key: str, value, accepted: str) -> ValueError:
    return ValueError(f"cache policy {policy!r}: {key}={value!r} is invalid; accepted: {accepted}")


def check_int(policy: str, key: str, v, lo: int, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        raise error(policy, key, v, f"an integer >= {lo}" if hi is None
                    else f"an integer in [{lo}, {hi}]")
    return v


def check_number(policy: str, key: str, v, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        rng = f"a number >= {lo:g}" if hi == math.inf else f"a number in [{lo:g}, {hi:g}]"
        raise error(policy, key, v, rng)
    return float(v)


def check_choice(policy: str, key: str, v, enum_or_choices):
    """``v`` among the choices (an Enum class: its members or their values -> the member)."""
    choices = list(enum_or_choices)
    if v not in choices:
        shown = [c.value if isinstance(c, Enum) else c for c in choices]
        raise error(policy, key, v, f"one of {shown}")
    return enum_or_choices(v) if isinstance(enum_or_choices, type) else v


def check_range(policy: str, key: str, v, strict: bool) -> tuple:
    """``(lo, hi)`` of two numbers with lo < hi (``strict``) or lo <= hi -> floats."""
    ok = (isinstance(v, (list, tuple)) and len(v) == 2
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
          and (v[0] < v[1] if strict else v[0] <= v[1]))
    if not ok:
        raise error(policy, key, v, f"(lo, hi) with lo {'<' if strict else '<='} hi")
    return float(v[0]), float(v[1])


def check_kind_map(policy: str, key: str, value, check: Callable[[str, Any], Any]) -> dict:
    """A dict keyed by module kind names -> ``{Kind: check(f"{key}.{kind}", value)}``."""
    if not isinstance(value, Mapping):
        raise error(policy, key, value, f"a dict with keys among {Kind.names()}")
    out = {}
    for k, v in value.items():
        if k not in Kind.names():
            raise error(policy, f"{key}.{k}", v, f"keys {Kind.names()}")
        out[Kind(k)] = check(f"{key}.{k}", v)
    return out


def check_forecast(policy: str, key: str, v) -> dict:
    """``forecast=dict(order=0|1|2, distance="step"|"timestep")`` (Taylor, the default method)
    or ``dict(method="bdf2", corrector=None|"heun", distance=...)`` -> the full dict (the
    method and corrector keys only for bdf2, whose order is 2: it keeps three anchors)."""
    if not isinstance(v, Mapping):
        raise error(policy, key, v, "dict(order=0|1|2, distance='step'|'timestep') or "
                                    "dict(method='bdf2', corrector=None|'heun')")
    out = {"order": None, "distance": "step", "method": "taylor", "corrector": None}
    for k, x in v.items():
        if k not in out:
            raise error(policy, f"{key}.{k}", x, f"keys {sorted(out)}")
        out[k] = x
    method = check_choice(policy, f"{key}.method", out["method"], FORECAST_METHODS)
    check_choice(policy, f"{key}.distance", out["distance"], DISTANCES)
    if method == "bdf2":
        if out["order"] not in (None, 2):
            raise error(policy, f"{key}.order", out["order"], "2 or absent with method 'bdf2'")
        check_choice(policy, f"{key}.corrector", out["corrector"], CORRECTORS)
        return {"order": 2, "distance": out["distance"], "method": "bdf2",
                "corrector": out["corrector"]}
    if out["corrector"] is not None:
        raise error(policy, f"{key}.corrector", out["corrector"], "None with method 'taylor'")
    order = check_int(policy, f"{key}.order", 0 if out["order"] is None else out["order"], 0)
    if order > MAX_ORDER:
        raise error(policy, f"{key}.order", order, f"an integer in [0, {MAX_ORDER}]")
    return {"order": order, "distance": out["distance"]}


# ------------------------------------------------------------------ checked fields
def checked(check: Check, default: Any = dataclasses.MISSING,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose value :func:`validate_fields` passes through ``check``."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"check": check})


def int_field(default: int, lo: int = 0, hi: int | None = None) -> Any:
    return checked(lambda p, k, v: check_int(p.name, k, v, lo, hi), default)


def number_field(default: float, lo: float = 0.0, hi: float = math.inf) -> Any:
    """A number in [lo, hi], stored as a float."""
    return checked(lambda p, k, v: check_number(p.name, k, v, lo, hi), default)


def choice_field(default: Any, choices: Any) -> Any:
    """One of ``choices`` (a tuple, or an Enum class: stored as its member)."""
    return checked(lambda p, k, v: check_choice(p.name, k, v, choices), default)


def bool_field(default: bool) -> Any:
    def check(p, k, v):
        if not isinstance(v, bool):
            raise error(p.name, k, v, "True or False")
        return v
    return checked(check, default)


def range_field(default: tuple, strict: bool = True) -> Any:
    return checked(lambda p, k, v: check_range(p.name, k, v, strict), default)


def stored_dtype_field() -> Any:
    """None (the model's dtype) | fp32 | fp16 | bf16 | fp8 | int8."""
    return choice_field(None, STORED_DTYPES)


def final_step_field(default: str) -> Any:
    """"plan" (the last step follows the plan) or "full" (it is computed)."""
    return choice_field(default, FINAL_STEPS)


def forecast_field() -> Any:
    return checked(lambda p, k, v: check_forecast(p.name, k, v),
                   default_factory=lambda: {"order": 0, "distance": "step"})


def validate_fields(policy: Any) -> None:
    """Run every field's check in declaration order and store the normalised values."""
    for f in dataclasses.fields(policy):
        check = f.metadata.get("check")
        if check is not None:
            object.__setattr__(policy, f.name, check(policy, f.name, getattr(policy, f.name)))


__all__ = ["STORED_DTYPES", "DISTANCES", "FINAL_STEPS", "MAX_ORDER", "FORECAST_METHODS",
           "CORRECTORS", "error", "check_int",
           "check_number", "check_choice", "check_range", "check_kind_map", "check_forecast",
           "checked", "int_field", "number_field", "choice_field", "bool_field", "range_field",
           "stored_dtype_field", "final_step_field", "forecast_field", "validate_fields"]
