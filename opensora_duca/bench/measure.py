"""Timing, peak memory and fidelity of one sampling run, and the interleaved benchmark loop
(the fields are described in ``tools/benchmark.py --help``)."""
from __future__ import annotations

import ctypes
import json
import os
import statistics
import time
from typing import List, Optional

import torch

from .benches import Bench, option_error
from .syncs import SyncCounter


class PeakMemory:
    """Peak memory above the level at :meth:`start` (see the module doc)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = None
        if device.type == "cuda":
            self.method = "cuda max_memory_allocated - memory_allocated at run start"
        elif _can_reset_hwm():
            self.method = ("peak RSS (VmHWM after clear_refs=5) - RSS at run start, after "
                           "malloc_trim")
        self._base = 0

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method:
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _proc_status_kb("VmRSS") * 1024

    def stop(self) -> Optional[int]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self._base)
        if self.method:
            return int(max(0, _proc_status_kb("VmHWM") * 1024 - self._base))
        return None


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _can_reset_hwm() -> bool:
    try:
        _proc_status_kb("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except (OSError, KeyError):
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StepTimer:
    """Wall time of every model call (denoising step) of a run: CUDA events recorded in the
    model's forward pre-/post-hooks (read after the run, so timing adds no sync), or
    ``time.perf_counter`` on a CPU. The pre-hook runs first, so the cache's per-step host work
    counts in its step."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self._handles = [model.register_forward_pre_hook(self._start, prepend=True),
                         model.register_forward_hook(self._stop)]

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _start(self, *_):
        self.marks.append([self._mark(), None])

    def _stop(self, *_):
        self.marks[-1][1] = self._mark()

    def seconds(self) -> List[float]:
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in self.marks]
        return [b - a for a, b in self.marks]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def step_kinds(labels: List[List[str]], seconds: List[List[float]], flops: List[float],
               full_s: float, full_flops: float) -> dict:
    """Per step kind: steps per run, median seconds over the timed runs, its FLOPs share of an
    uncached step, and the ideal time (that share of ``full_s``, the uncached step's median)."""
    out: dict = {}
    for run_labels, run_s in zip(labels, seconds):
        for lab, dt, fl in zip(run_labels, run_s, flops):
            d = out.setdefault(lab, dict(times=[], flops=fl))
            d["times"].append(dt)
    runs = max(len(labels), 1)
    table = {}
    for lab, d in out.items():
        med = statistics.median(d["times"])
        share = d["flops"] / full_flops if full_flops else None
        ideal = None if share is None else share * full_s
        table[lab] = dict(steps=len(d["times"]) // runs, median_s=med, flops_share=share,
                          ideal_s=ideal, vs_ideal=(med / ideal) if ideal else None)
    return table


def timed_run(bench: Bench) -> tuple[torch.Tensor, float, float]:
    """(final latents, wall seconds, process CPU seconds) of one sampling run."""
    c0 = time.process_time()
    if bench.device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(bench.device)
        start.record()
        z = bench.sample()
        end.record()
        torch.cuda.synchronize(bench.device)
        return z, start.elapsed_time(end) / 1e3, time.process_time() - c0
    t0 = time.perf_counter()
    z = bench.sample()
    return z, time.perf_counter() - t0, time.process_time() - c0


def _unit_range(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    lo, hi = float(ref.min()), float(ref.max())
    return (x.double() - lo) / max(hi - lo, 1e-12)


def fidelity(z: torch.Tensor, z_ref: torch.Tensor) -> dict:
    """PSNR / SSIM of latents [B, C, T, H, W] mapped to [0, 1] by the reference's range."""
    from ..eval.fidelity import psnr, ssim

    a, b = _unit_range(z.cpu(), z_ref.cpu()), _unit_range(z_ref.cpu(), z_ref.cpu())
    out = {"psnr": psnr(a, b, layout="BCTHW"), "ssim": None,
           "rel_l2": float((z.double().cpu() - z_ref.double().cpu()).norm()
                           / z_ref.double().cpu().norm().clamp_min(1e-30))}
    if min(z.shape[-2:]) >= 11:
        out["ssim"] = ssim(a, b, layout="BCTHW")
    return out


def frame_fidelity(v: torch.Tensor, v_ref: torch.Tensor) -> dict:
    """PSNR / SSIM of decoded frames [B, 3, T, H, W] in [-1, 1] (compared in [0, 1])."""
    from ..eval.fidelity import psnr, ssim

    a, b = (v.double() + 1) / 2, (v_ref.double() + 1) / 2
    out = {"psnr_frames": psnr(a, b, layout="BCTHW"), "ssim_frames": None}
    if min(v.shape[-2:]) >= 11:
        out["ssim_frames"] = ssim(a, b, layout="BCTHW")
    return out


POLICIES_ACCEPTED = ("a comma-separated list of registered policies {known}, each a name or "
                     "NAME:key=value,... (values in JSON, e.g. FORA:interval=6,warmup_steps=2), "
                     "or a JSON list of names and dicts with a 'type'")


def _json_value(text: str):
    """A ``key=value`` value: JSON (numbers, true/false/null, lists, objects), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _config_items(text: str, known: list) -> list:
    """``NAME`` and ``NAME:key=value,key=value`` items of a comma-separated list (a token with
    ``=`` and no ``:`` continues the config before it) -> names and ``dict(type=...)``s.
    A value with a comma needs the JSON-list form."""
    items: list = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        if ":" in tok:
            name, _, kv = tok.partition(":")
            items.append({"type": name.strip()})
            tok = kv
        elif "=" not in tok:
            items.append(tok)
            continue
        elif not items or not isinstance(items[-1], dict):
            raise option_error("--policies", text, POLICIES_ACCEPTED.format(known=known))
        key, eq, val = tok.partition("=")
        if not eq or not key.strip() or key.strip() in items[-1]:
            raise option_error("--policies", text, POLICIES_ACCEPTED.format(known=known) +
                               " (each key once)")
        items[-1][key.strip()] = _json_value(val.strip())
    return items


def policy_label(item) -> str:
    """A policy's name in reports: the name itself, or ``NAME:key=value,...`` (JSON values)."""
    if isinstance(item, str):
        return item
    rest = ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}"
                    for k, v in item.items() if k != "type")
    return f"{item['type']}:{rest}" if rest else item["type"]


def policy_config(item) -> dict:
    """The cache config of an item of :func:`parse_policies`."""
    return dict(type=item) if isinstance(item, str) else dict(item)


def parse_policies(text: str, configs: bool = False) -> list:
    """``--policies`` -> the policies to run, ``none`` (the reference) first. Without
    ``configs``: registered names only (strings). With ``configs``: also ``NAME:key=value,...``
    items and a JSON list (``[..., {"type": "FORA", "interval": 6}]``); a config comes back as a
    dict, built once here so that a bad key or value is one line (the policy's own message).
    Plain names stay strings."""
    from .. import cache  # noqa: F401  (registers the policies)
    from ..cache.policies import build_policy
    from ..registry import CACHES as REG
    from ..registry import registered

    known = registered(REG)
    accepted = (POLICIES_ACCEPTED if configs else
                "a comma-separated list of registered policies {known}").format(known=known)
    if configs and text.strip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            raise option_error("--policies", text, accepted) from None
        if not isinstance(items, list) or not all(
                isinstance(i, str) or (isinstance(i, dict) and isinstance(i.get("type"), str))
                for i in items):
            raise option_error("--policies", text, accepted)
    elif configs:
        items = _config_items(text, known)
    else:
        items = [p.strip() for p in text.split(",") if p.strip()]
    items = [i if isinstance(i, str) or len(i) > 1 else i["type"] for i in items]
    bad = [policy_label(i) for i in items
           if (i if isinstance(i, str) else i["type"]) not in known]
    if not items or bad:
        raise option_error("--policies", text, accepted)
    for i in items:
        if isinstance(i, dict):
            try:
                build_policy(i)
            except (ValueError, KeyError, TypeError) as err:
                msg = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
                raise ValueError(f"--policies item {policy_label(i)!r}: "
                                 f"{msg.strip().splitlines()[0]}") from None
    labels = [policy_label(i) for i in items]
    if len(set(labels)) != len(labels):
        raise option_error("--policies", text, "each policy at most once")
    return ["none"] + [i for i, lab in zip(items, labels) if lab != "none"]


def run_benchmark(bench: Bench, policies: list, repeat: int, warmup: int,
                  log=print, compile=None, count_syncs: bool = True) -> dict:
    """Interleaved rounds over ``policies`` (names or configs, as :func:`parse_policies`
    returns them; a row's ``policy`` is :func:`policy_label`), compiled with ``compile`` options
    when given, then one run per policy counting host-device syncs; returns the JSON-ready
    report."""
    from ..cache import apply_cache, remove_cache
    from ..utils.compile import compile_options, compiled_graphs

    if repeat < 1:
        raise option_error("--repeat", repeat, "an int >= 1")
    if warmup < 0:
        raise option_error("--warmup", warmup, "an int >= 0")
    n_steps = bench.num_steps
    labels = [policy_label(p) for p in policies]
    cfgs = {lab: policy_config(p) for lab, p in zip(labels, policies)}
    policies = labels
    if len(set(labels)) != len(labels) or "none" not in cfgs:
        raise option_error("--policies", policies, "distinct policies, 'none' among them")
    copts = compile_options(compile)
    # known on the host (rounded as the sampler passes them): the cache never reads them
    host_ts = bench.timesteps().to(bench.dtype).cpu().tolist()
    if bench.device.type == "cpu" and warmup == 0:  # one untimed model call
        with torch.no_grad():
            bench.model(torch.cat([bench.z0, bench.z0]), bench.timesteps()[:1].expand(
                2 * bench.z0.shape[0]), torch.cat([bench.y, bench.y_null]),
                mask=None if bench.mask is None else torch.cat([bench.mask, bench.mask]),
                **bench.additional_args)
    mem = PeakMemory(bench.device)
    times = {p: [] for p in policies}
    cpu_times = {p: [] for p in policies}
    peaks = {p: [] for p in policies}
    stats, finals = {}, {}
    step_s = {p: [] for p in policies}
    labels = {p: [] for p in policies}
    graphs_after_warmup = None
    for r in range(warmup + repeat):
        timed = r >= warmup
        if timed and graphs_after_warmup is None:
            graphs_after_warmup = compiled_graphs()
        for p in policies:
            mgr = apply_cache(bench.model, cfgs[p], compile=copts)
            timer = StepTimer(bench.model, bench.device)
            try:
                with mgr.session(n_steps, timesteps=host_ts):
                    mem.start()
                    z, dt, dc = timed_run(bench)
                    peak = mem.stop()
                stats[p] = mgr.stats()
            finally:
                timer.remove()
                remove_cache(bench.model)
            if timed:
                times[p].append(dt)
                cpu_times[p].append(dc)
                peaks[p].append(peak)
                finals[p] = z.float().cpu()
                step_s[p].append(timer.seconds())
                labels[p].append(stats[p]["step_labels"])
            log(f"[{'run' if timed else 'warm-up'} {r - warmup + 1 if timed else r + 1}] "
                f"{p:<10s} {dt:8.3f} s wall, {dc:8.3f} s CPU")
    graphs_timed = compiled_graphs() - graphs_after_warmup
    syncs, sync_method = {}, None
    for p in policies if count_syncs else ():
        mgr = apply_cache(bench.model, cfgs[p], compile=copts)
        try:
            with mgr.session(n_steps, timesteps=host_ts), SyncCounter(bench.device) as counter:
                bench.sample()
        finally:
            remove_cache(bench.model)
        syncs[p], sync_method = counter.count, counter.method
    ref = finals["none"]
    none_steps = [dt for run in step_s["none"] for dt in run]
    full_s = statistics.median(none_steps)
    full_flops = stats["none"]["step_flops"][0] if stats["none"]["step_flops"] else 0.0
    ref_frames = bench.decode(ref) if bench.decode is not None else None
    med_none = statistics.median(times["none"])
    cpu_none = statistics.median(cpu_times["none"])
    results = []
    for p in policies:
        med = statistics.median(times[p])
        st = stats[p]
        fid = fidelity(finals[p], ref)
        med_cpu = statistics.median(cpu_times[p])
        row = dict(policy=p, median_s=med, times_s=times[p], speedup=med_none / med,
                   min_s=min(times[p]), speedup_min=min(times["none"]) / min(times[p]),
                   median_cpu_s=med_cpu, cpu_times_s=cpu_times[p],
                   speedup_cpu=cpu_none / med_cpu if med_cpu > 0 else None,
                   flops_ratio=float(st["flops_ratio"]),
                   peak_cache_bytes=int(st["peak_stored_bytes"]),
                   peak_mem_bytes=None if any(v is None for v in peaks[p]) else max(peaks[p]),
                   bookkeeping_s=float(st["bookkeeping_s"]),
                   bookkeeping_frac=float(st["bookkeeping_s"]) / med if med > 0 else None,
                   psnr=fid["psnr"], ssim=fid["ssim"], rel_l2=fid["rel_l2"],
                   steps_by_kind=st["steps_by_kind"], policy_config=st["policy"],
                   step_kinds=step_kinds(labels[p], step_s[p], st["step_flops"], full_s,
                                         full_flops),
                   syncs_per_run=syncs.get(p))
        if ref_frames is not None:
            row.update(frame_fidelity(bench.decode(finals[p]), ref_frames))
        results.append(row)
    return {"device": device_name(bench.device), "preset": bench.name, "torch": torch.__version__,
            "dtype": str(bench.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
            "repeat": repeat, "warmup": warmup, "num_steps": n_steps,
            "compile": None if copts is None else vars(copts),
            "graphs_compiled_in_timed_runs": graphs_timed if copts is not None else None,
            "sync_method": sync_method, "full_step_s": full_s,
            "peak_mem_method": mem.method, "setup": bench.info, "results": results}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.getdevice_name(device)})"
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
