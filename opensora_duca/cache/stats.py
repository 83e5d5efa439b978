"""What a cache did: steps by kind, module actions, analytic FLOPs, stored bytes, host time —
summed over every run and session since the cache was attached (or ``reset_stats()``) — and the
open run's own counts, which a finished run logs once where the manager says so."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

from .. import parallel as sp
from . import selection as sel
from .plan import Action, StepKind, StepPlan
from .state import StoredBytes

LOGGER = logging.getLogger("opensora_duca.cache")


class CacheStats:
    """The counters of one cache manager."""

    def __init__(self, counter: StoredBytes):
        self.bytes = counter
        self._run_mark: Optional[tuple] = None
        self.reset()

    def reset(self) -> None:
        """Start every count again (the open run counts from here)."""
        self.runs = 0
        # adaptive policies, per step: the measured change and the decision of each group
        self.changes: List[List[Optional[float]]] = []
        self.group_labels: List[List[str]] = []
        self.step_labels: List[str] = []
        self.module_counts: Dict[str, Dict[str, int]] = {}
        self.partial_tokens = 0
        self.flops_uncached = 0.0
        self.flops_actual = 0.0
        self.step_flops: List[float] = []
        self.bookkeeping_s = 0.0
        self.bytes.peak = self.bytes.current
        if self._run_mark is not None:
            self._run_mark = (0, 0.0, 0.0, self._run_mark[3])

    # ------------------------------------------------------------------ counting
    def count_module(self, kind: str, action: Action) -> None:
        d = self.module_counts.setdefault(kind, {})
        d[action] = d.get(action, 0) + 1

    def count_partial(self, k_local: int) -> None:
        self.partial_tokens += k_local

    def count_step(self, plan: StepPlan, shape, grid_key, flops) -> None:
        """A finished step: its label and its analytic FLOPs against an uncached step
        (``flops``: the layout's ``full_step_flops`` / ``step_flops`` of its ``shape``)."""
        self.step_labels.append(plan.label)
        if shape is None:
            return
        T, H, W = grid_key[:3]
        grid = sel.TokenGrid(frames=T, rows=H, width=W, local_rows=H, row_offset=0)
        part = {k: sel.selected_per_sample(plan.ratios[k], grid)
                for k, a in plan.actions.items() if a == Action.PARTIAL}
        self.flops_uncached += flops.full_step_flops(shape)
        self.step_flops.append(flops.step_flops(shape, plan, part))
        self.flops_actual += self.step_flops[-1]

    # ------------------------------------------------------------------ runs
    def open_run(self, note: Optional[str]) -> None:
        """A run starts (``note``: why it was split from the previous one, if it was)."""
        self.runs += 1
        self._run_mark = (len(self.step_labels), self.flops_uncached, self.flops_actual, note)
        self.bytes.run_peak = self.bytes.current

    @property
    def run_open(self) -> bool:
        return self._run_mark is not None

    def run_summary(self, policy: str, stores: bool) -> Optional[dict]:
        """Counts of the open run: policy, steps by kind, FLOPs ratio, peak stored bytes, and
        ``note``: why no step could be cached, when none was (``stores``: the policy caches)."""
        if self._run_mark is None:
            return None
        start, unc0, act0, note = self._run_mark
        labels = [str(lab) for lab in self.step_labels[start:]]
        by_kind = _by_kind(labels)
        unc, act = self.flops_uncached - unc0, self.flops_actual - act0
        if stores and all(lab == str(StepKind.FULL) for lab in labels):
            note = note or (f"the run had {len(labels)} step(s), all computed in full by the "
                            f"policy's plan")
        else:
            note = None
        return {"policy": policy, "steps": len(labels), "steps_by_kind": by_kind,
                "flops_ratio": unc / act if act else (float("inf") if unc else 1.0),
                "peak_stored_bytes": self.bytes.run_peak, "note": note}

    def finish_run(self, policy: str, stores: bool, log: bool) -> None:
        """The open run is over: with ``log``, log its report once (rank 0)."""
        summary = self.run_summary(policy, stores)
        self._run_mark = None
        if summary is None or not summary["steps"] or not log or sp.global_rank():
            return
        kinds = ", ".join(f"{n} {k}" for k, n in summary["steps_by_kind"].items())
        mib = summary["peak_stored_bytes"] / 2**20
        line = (f"opensora_duca cache: run {self.runs} finished: {policy}, {summary['steps']} "
                f"steps, {summary['flops_ratio']:.2f}x fewer FLOPs, peak {mib:.1f} MiB stored")
        rows = [f"  {'policy':<15}: {policy}",
                f"  {'steps':<15}: {summary['steps']} ({kinds})",
                f"  {'FLOPs ratio':<15}: {summary['flops_ratio']:.2f}x fewer than uncached "
                f"(analytic, trunk matmuls)",
                f"  {'peak cache mem':<15}: {mib:.1f} MiB"]
        if summary["note"]:
            rows.append(f"  {'no step cached':<15}: {summary['note']}")
        LOGGER.info("%s\n%s", line, "\n".join(rows))

    # ------------------------------------------------------------------ reading
    def as_dict(self, policy: dict, groups: List[List[int]]) -> dict:
        """Steps by kind, module actions, FLOPs ratio (uncached / actual, analytic), peak
        stored bytes, bookkeeping seconds, summed over every run.

        ``bookkeeping_s`` is host time spent planning, selecting tokens and gathering /
        scattering them, measured with ``time.perf_counter`` and no device synchronisation: on
        a CPU it is the real cost, on CUDA it is the launch overhead only (use
        ``tools/benchmark.py`` for device time).

        Adaptive policies decide per clip: ``groups`` are the batch rows that decide together
        (a clip's CFG copies) in the last run, and per step ``changes`` holds each group's
        measured change (None: nothing to compare with) and ``group_labels`` its decision."""
        return {
            "policy": policy,
            "steps": len(self.step_labels),
            "runs": self.runs,
            "steps_by_kind": _by_kind(self.step_labels),
            "step_labels": [str(lab) for lab in self.step_labels],
            "modules": {str(k): {str(a): n for a, n in v.items()}
                        for k, v in self.module_counts.items()},
            "partial_tokens": self.partial_tokens,
            "flops_uncached": self.flops_uncached,
            "flops_actual": self.flops_actual,
            "step_flops": list(self.step_flops),
            "flops_ratio": (self.flops_uncached / self.flops_actual) if self.flops_actual else
            (float("inf") if self.flops_uncached else 1.0),
            "peak_stored_bytes": self.bytes.peak,
            "stored_bytes": self.bytes.current,
            "bookkeeping_s": self.bookkeeping_s,
            "changes": [list(c) for c in self.changes],
            "groups": [list(g) for g in groups],
            "group_labels": [list(g) for g in self.group_labels],
        }


def _by_kind(labels) -> Dict[str, int]:
    """Steps per label, in order of first occurrence."""
    out: Dict[str, int] = {}
    for lab in map(str, labels):
        out[lab] = out.get(lab, 0) + 1
    return out


def format_report(s: dict) -> str:
    """The table of :meth:`CacheManager.report` from its ``stats()``."""
    kinds = ", ".join(f"{v} {k}" for k, v in s["steps_by_kind"].items())
    return "\n".join([
        f"cache policy   : {s['policy']['type']}",
        f"steps          : {s['steps']} ({kinds})",
        f"FLOPs ratio    : {s['flops_ratio']:.2f}x fewer than uncached "
        f"(analytic, trunk matmuls)",
        f"peak cache mem : {s['peak_stored_bytes'] / 2**20:.1f} MiB",
        f"bookkeeping    : {s['bookkeeping_s'] * 1e3:.1f} ms (host time)",
    ])
