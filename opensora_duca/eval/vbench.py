"""Glue to the VBench benchmark (PyPI ``vbench==0.1.5``), which is imported lazily.

What lives here:

* prompt suite loading from the *installed* package's ``VBench_full_info.json`` (never copied into
  the project) or from a text file with one prompt per line, with an optional dimension filter;
* the ``{prompt}-{i}.mp4`` naming VBench's ``vbench_standard`` mode expects, the list of generation
  jobs (skipping complete files, so an interrupted run resumes) and sharding;
* scoring through ``VBench(...).evaluate(..., local=True)`` one dimension at a time, with a local
  weights folder (``VBENCH_CACHE_DIR``); dimensions whose weights are missing are skipped and
  listed;
* VBench's normalisation and the Quality / Semantic / Total scores.

Partial dimension sets: Quality is ``sum(normalised * weight) / sum(weights)`` over the quality
dimensions that were actually scored (with all 7 that is VBench's ``sum / 6.5``), Semantic the mean
over the scored semantic dimensions, Total ``(4 Q + S) / 5`` only when both groups have at least one
scored dimension. Every summary carries the list of dimensions it was computed from and a
``complete`` flag, so a partial number is never mistaken for the published 16-dimension score.

``import vbench`` imports torchvision. When torchvision's compiled ops cannot be loaded beside the
installed torch (e.g. the PyPI torchvision 0.28.0 wheel next to a CPU torch: ``operator
torchvision::nms does not exist``), :func:`ensure_torchvision_importable` declares the two operator
schemas torchvision's import registers fake kernels for (``nms``, ``qnms``) with ``torch.library``,
with no implementation: torchvision then imports, its pure-python parts (transforms, models) work,
and any call of a compiled op still fails with torchvision's own "Couldn't load custom C++ ops"
error.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

INSTALL_HINT = (
    "VBench is not importable. Install it without its heavy pinned requirements:\n"
    "  pip install --no-deps vbench==0.1.5 torchvision==0.28.0\n"
    "  pip install decord==0.6.0 'opencv-python-headless<4.12' 'numpy<2' tqdm pillow\n"
    "(see requirements-vbench.txt; never `pip install torch` unpinned)."
)

QUALITY_DIMENSIONS = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "dynamic_degree",
    "aesthetic_quality",
    "imaging_quality",
)
SEMANTIC_DIMENSIONS = (
    "object_class",
    "multiple_objects",
    "human_action",
    "color",
    "spatial_relationship",
    "scene",
    "temporal_style",
    "appearance_style",
    "overall_consistency",
)
ALL_DIMENSIONS = QUALITY_DIMENSIONS + SEMANTIC_DIMENSIONS

# VBench's published normalisation: (x - min) / (max - min) * weight
NORMALIZE_MIN_MAX = {d: (0.0, 1.0) for d in ALL_DIMENSIONS}
NORMALIZE_MIN_MAX.update(
    {
        "subject_consistency": (0.1462, 1.0),
        "background_consistency": (0.2615, 1.0),
        "temporal_flickering": (0.6293, 1.0),
        "motion_smoothness": (0.706, 0.9975),
        "scene": (0.0, 0.8222),
        "appearance_style": (0.0009, 0.2855),
        "temporal_style": (0.0, 0.364),
        "overall_consistency": (0.0, 0.364),
    }
)
DIMENSION_WEIGHT = {d: 1.0 for d in ALL_DIMENSIONS}
DIMENSION_WEIGHT["dynamic_degree"] = 0.5
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0

# Files each dimension needs under $VBENCH_CACHE_DIR, as vbench 0.1.5's `init_submodules`
# (local=True) and the dimension modules look for them (a missing one would otherwise be fetched
# with wget).
REQUIRED_FILES: Dict[str, Tuple[str, ...]] = {
    "subject_consistency": (
        "dino_model/facebookresearch_dino_main/hubconf.py",
        "dino_model/dino_vitbase16_pretrain.pth",
    ),
    "background_consistency": ("clip_model/ViT-B-32.pt",),
    "temporal_flickering": (),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "dynamic_degree": ("raft_model/models/raft-things.pth",),
    "aesthetic_quality": (
        "clip_model/ViT-L-14.pt",
        "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
    ),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
    "object_class": ("grit_model/grit_b_densecap_objectdet.pth",),
    "multiple_objects": ("grit_model/grit_b_densecap_objectdet.pth",),
    "color": ("grit_model/grit_b_densecap_objectdet.pth",),
    "spatial_relationship": ("grit_model/grit_b_densecap_objectdet.pth",),
    "scene": ("caption_model/tag2text_swin_14m.pth",),
    "human_action": ("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",),
    "temporal_style": (
        "ViCLIP/ViClip-InternVid-10M-FLT.pth",
        "ViCLIP/bpe_simple_vocab_16e6.txt.gz",
    ),
    "overall_consistency": (
        "ViCLIP/ViClip-InternVid-10M-FLT.pth",
        "ViCLIP/bpe_simple_vocab_16e6.txt.gz",
    ),
    "appearance_style": ("clip_model/ViT-B-32.pt",),
}
# Not checked here: GRiT (object_class, multiple_objects, color, spatial_relationship) and Tag2Text
# (scene) also load the `bert-base-uncased` tokenizer through transformers / the Hugging Face cache,
# and several dimensions need extra python packages (detectron2, pyiqa/timm, transformers, ...); a
# missing package shows up as a per-dimension failure with the import error.
EXTRA_NOTES = {
    "object_class": "also needs detectron2 and the HF `bert-base-uncased` tokenizer",
    "multiple_objects": "also needs detectron2 and the HF `bert-base-uncased` tokenizer",
    "color": "also needs detectron2 and the HF `bert-base-uncased` tokenizer",
    "spatial_relationship": "also needs detectron2 and the HF `bert-base-uncased` tokenizer",
    "scene": "also needs transformers and the HF `bert-base-uncased` tokenizer",
}


# --------------------------------------------------------------------------------------------------
# importing vbench
# --------------------------------------------------------------------------------------------------
class VBenchUnavailable(ImportError):
    pass


def _torchvision_op_exists(name: str = "nms") -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


_SHIM_LIB = None  # keep the torch.library.Library alive for the process lifetime


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` work when its compiled ops cannot load; returns True if a shim
    was installed. A no-op when torchvision is not installed, already imported, or its ops load."""
    global _SHIM_LIB
    if "torchvision" in sys.modules or _SHIM_LIB is not None:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    if _torchvision_op_exists("nms"):
        return False
    tv_dir = list(spec.submodule_search_locations)[0]
    for lib_path in sorted(
        glob.glob(os.path.join(tv_dir, "_C*.so")) + glob.glob(os.path.join(tv_dir, "_C*.pyd"))
    ):
        try:
            torch.ops.load_library(lib_path)
        except (OSError, RuntimeError, ImportError):
            continue
        if _torchvision_op_exists("nms"):
            return False  # the real ops load fine
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        if not _torchvision_op_exists(op):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SHIM_LIB = lib
    return True


def vbench_package_dir() -> str:
    """Folder of the installed ``vbench`` package (found without importing it)."""
    spec = importlib.util.find_spec("vbench")
    if spec is None or not spec.submodule_search_locations:
        raise VBenchUnavailable(INSTALL_HINT)
    return list(spec.submodule_search_locations)[0]


def full_info_json_path() -> str:
    """``VBench_full_info.json`` shipped inside the installed vbench package."""
    path = os.path.join(vbench_package_dir(), "VBench_full_info.json")
    if not os.path.isfile(path):
        raise VBenchUnavailable(
            f"{path} is missing from the installed vbench package.\n{INSTALL_HINT}"
        )
    return path


def _set_cache_dir(cache_dir: Optional[str]) -> None:
    if cache_dir is None:
        return
    cache_dir = os.path.abspath(cache_dir)
    os.environ["VBENCH_CACHE_DIR"] = cache_dir
    # vbench reads the variable at import time into module globals (`vbench.utils.CACHE_DIR`, and
    # `from vbench.utils import CACHE_DIR` copies in some dimension modules): update loaded ones.
    for name, mod in list(sys.modules.items()):
        if (
            (name == "vbench" or name.startswith("vbench."))
            and mod is not None
            and hasattr(mod, "CACHE_DIR")
        ):
            setattr(mod, "CACHE_DIR", cache_dir)


def import_vbench(cache_dir: Optional[str] = None):
    """Import and return the ``vbench`` package (shimming torchvision if needed).

    Raises :class:`VBenchUnavailable` with install instructions when it cannot be imported."""
    if cache_dir is not None:
        os.environ["VBENCH_CACHE_DIR"] = os.path.abspath(cache_dir)
    if importlib.util.find_spec("vbench") is None:
        raise VBenchUnavailable(INSTALL_HINT)
    try:
        ensure_torchvision_importable()
        mod = importlib.import_module("vbench")
    except ImportError as e:
        raise VBenchUnavailable(
            f"importing vbench failed: {type(e).__name__}: {e}\n{INSTALL_HINT}"
        ) from e
    except RuntimeError as e:
        raise VBenchUnavailable(
            f"importing vbench failed: RuntimeError: {e}\n{INSTALL_HINT}"
        ) from e
    _set_cache_dir(cache_dir)
    return mod


# --------------------------------------------------------------------------------------------------
# prompts, naming, jobs
# --------------------------------------------------------------------------------------------------
def load_full_info(full_info_path: Optional[str] = None) -> List[dict]:
    with open(full_info_path or full_info_json_path(), "r", encoding="utf-8") as f:
        return json.load(f)


def load_prompts(
    prompt_path: Optional[str] = None,
    dimensions: Optional[Sequence[str]] = None,
    full_info_path: Optional[str] = None,
) -> List[str]:
    """Prompts in suite order, without duplicates.

    With ``prompt_path`` (a text file, one prompt per line, blank lines ignored) the dimension
    filter does not apply (a plain text file carries no dimension tags). Otherwise the installed
    package's ``VBench_full_info.json`` is read and, with ``dimensions``, only prompts tagged with
    at least one of them are kept."""
    if prompt_path is not None:
        if dimensions:
            raise ValueError(
                "a dimension filter needs the VBench full-info JSON, not a plain prompt file"
            )
        with open(prompt_path, "r", encoding="utf-8") as f:
            prompts = [line.strip() for line in f]
        prompts = [p for p in prompts if p]
    else:
        entries = load_full_info(full_info_path)
        if dimensions:
            unknown = set(dimensions) - set(ALL_DIMENSIONS)
            if unknown:
                raise ValueError(
                    f"unknown VBench dimensions {sorted(unknown)}; known: {list(ALL_DIMENSIONS)}"
                )
            wanted = set(dimensions)
            entries = [e for e in entries if wanted & set(e.get("dimension", []))]
        prompts = [e["prompt_en"] for e in entries]
    seen, out = set(), []
    for p in prompts:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def video_filename(prompt: str, index: int, ext: str = ".mp4") -> str:
    """``{prompt}-{index}{ext}``, the name VBench's standard mode looks for."""
    if "/" in prompt or "\0" in prompt:
        raise ValueError(f"prompt cannot be used as a file name (contains '/' or NUL): {prompt!r}")
    name = f"{prompt}-{int(index)}{ext}"
    if len(name.encode("utf-8")) > 255:
        raise ValueError(f"file name for prompt would exceed 255 bytes: {prompt[:60]!r}...")
    return name


@dataclass(frozen=True)
class GenerationJob:
    prompt: str
    index: int  # sample index i in {prompt}-{i}.mp4
    seed: int
    path: str
    prompt_index: int  # position of the prompt in the suite

    def to_dict(self) -> dict:
        return asdict(self)


def sample_seed(base_seed: int, index: int) -> int:
    """Seed of sample ``index`` of any prompt: ``base_seed + index`` (identical for a cached and an
    uncached run, which is what the fidelity comparison needs)."""
    return int(base_seed) + int(index)


def list_jobs(
    prompts: Sequence[str],
    out_dir: str,
    num_samples: int = 5,
    base_seed: int = 0,
    start: int = 0,
    end: Optional[int] = None,
    skip_complete: bool = True,
    ext: str = ".mp4",
) -> List[GenerationJob]:
    """Jobs ``(prompt, index, seed, path)`` for prompts ``[start, end)`` and samples
    ``0..num_samples-1``.

    With ``skip_complete`` a job whose file already decodes (:func:`is_complete_video`) is dropped,
    so a rerun resumes an interrupted evaluation; temporary files of writes are never complete."""
    from opensora_duca.utils.video import is_complete_video

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    n = len(prompts)
    end = n if end is None else min(int(end), n)
    start = max(int(start), 0)
    jobs = []
    for pi in range(start, end):
        prompt = prompts[pi]
        for i in range(num_samples):
            path = os.path.join(out_dir, video_filename(prompt, i, ext))
            if skip_complete and is_complete_video(path):
                continue
            jobs.append(GenerationJob(prompt, i, sample_seed(base_seed, i), path, pi))
    return jobs


def shard(items: Sequence, rank: int, world: int) -> list:
    """Round-robin share of ``items`` for ``rank`` out of ``world`` workers (disjoint, covering)."""
    if world < 1 or not (0 <= rank < world):
        raise ValueError(f"need 0 <= rank < world and world >= 1, got rank={rank}, world={world}")
    return list(items[rank::world])


# --------------------------------------------------------------------------------------------------
# normalisation and summary scores
# --------------------------------------------------------------------------------------------------
def normalize_score(dimension: str, raw: float) -> float:
    """``(raw - min) / (max - min) * weight`` (VBench's published recipe), as a fraction."""
    if dimension not in NORMALIZE_MIN_MAX:
        raise ValueError(f"unknown VBench dimension {dimension!r}")
    lo, hi = NORMALIZE_MIN_MAX[dimension]
    return (float(raw) - lo) / (hi - lo) * DIMENSION_WEIGHT[dimension]


def final_scores(raw_scores: Dict[str, float]) -> dict:
    """Quality / Semantic / Total (percent) from raw per-dimension scores (fractions in [0, 1]).

    Over whatever dimensions are given: Quality = sum(normalised) / sum(weights) of the scored
    quality dimensions, Semantic = mean of the scored semantic dimensions, Total = (4 Q + S) / 5
    when both groups have at least one dimension, else None. ``complete`` says whether all 16 were
    scored."""
    unknown = set(raw_scores) - set(ALL_DIMENSIONS)
    if unknown:
        raise ValueError(f"unknown VBench dimensions {sorted(unknown)}")
    norm = {d: normalize_score(d, v) for d, v in raw_scores.items() if v is not None}
    q_dims = [d for d in QUALITY_DIMENSIONS if d in norm]
    s_dims = [d for d in SEMANTIC_DIMENSIONS if d in norm]
    quality = (
        sum(norm[d] for d in q_dims) / sum(DIMENSION_WEIGHT[d] for d in q_dims) if q_dims else None
    )
    semantic = sum(norm[d] for d in s_dims) / len(s_dims) if s_dims else None
    total = None
    if quality is not None and semantic is not None:
        total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (
            QUALITY_WEIGHT + SEMANTIC_WEIGHT
        )
    pct = lambda x: None if x is None else 100.0 * x  # noqa: E731
    q_complete = len(q_dims) == len(QUALITY_DIMENSIONS)
    s_complete = len(s_dims) == len(SEMANTIC_DIMENSIONS)
    notes = []
    if not (q_complete and s_complete):
        notes.append(
            "partial dimension set: Quality/Semantic are computed only over the scored dimensions "
            "listed in quality_dims/semantic_dims (Quality = sum of normalised scores / sum of "
            "their weights; Semantic = their mean); not comparable to the published 16-dimension "
            "VBench scores"
        )
    if total is None:
        notes.append("Total needs at least one quality and one semantic dimension; not reported")
    return {
        "normalized": {d: pct(v) for d, v in norm.items()},
        "quality": pct(quality),
        "semantic": pct(semantic),
        "total": pct(total),
        "quality_dims": q_dims,
        "semantic_dims": s_dims,
        "quality_complete": q_complete,
        "semantic_complete": s_complete,
        "complete": q_complete and s_complete,
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------
def missing_files(dimension: str, cache_dir: str) -> List[str]:
    """Paths under ``cache_dir`` that ``dimension`` needs and that do not exist."""
    if dimension not in REQUIRED_FILES:
        raise ValueError(f"unknown VBench dimension {dimension!r}")
    return [
        os.path.join(cache_dir, rel)
        for rel in REQUIRED_FILES[dimension]
        if not os.path.isfile(os.path.join(cache_dir, rel))
    ]


def plan_dimensions(
    dimensions: Optional[Sequence[str]], cache_dir: str
) -> Tuple[List[str], Dict[str, List[str]]]:
    """Split ``dimensions`` (default: all 16) into runnable ones and ``{dim: [missing files]}``."""
    dims = list(dimensions) if dimensions else list(ALL_DIMENSIONS)
    unknown = [d for d in dims if d not in ALL_DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown VBench dimensions {unknown}; known: {list(ALL_DIMENSIONS)}")
    runnable, missing = [], {}
    for d in dims:
        m = missing_files(d, cache_dir)
        if m:
            missing[d] = m
        else:
            runnable.append(d)
    return runnable, missing


def _stage_videos(videos_dir: str, stage_dir: str) -> Tuple[List[str], List[str]]:
    """Link complete videos into ``stage_dir`` (VBench lists the folder and takes the extension of
    the first entry, so stray temporary / non-video files must not be there). Returns (staged, not
    staged)."""
    from opensora_duca.utils.atomic import is_temp_name
    from opensora_duca.utils.video import is_complete_video

    if os.path.isdir(stage_dir):
        shutil.rmtree(stage_dir)
    os.makedirs(stage_dir)
    staged, rejected = [], []
    for name in sorted(os.listdir(videos_dir)):
        src = os.path.join(videos_dir, name)
        if not os.path.isfile(src):
            continue
        if is_temp_name(name) or not name.lower().endswith(".mp4"):
            rejected.append(name)
            continue
        if not is_complete_video(src):
            rejected.append(name)
            continue
        dst = os.path.join(stage_dir, name)
        try:
            os.symlink(os.path.abspath(src), dst)
        except OSError:
            shutil.copy2(src, dst)
        staged.append(name)
    return staged, rejected


def expected_videos(
    dimensions: Sequence[str], num_samples: int = 5, full_info_path: Optional[str] = None
) -> List[str]:
    """File names VBench's standard mode looks for, for these dimensions."""
    prompts = load_prompts(dimensions=dimensions, full_info_path=full_info_path)
    return [video_filename(p, i) for p in prompts for i in range(num_samples)]


def evaluate(
    videos_dir: str,
    weights_dir: str,
    dimensions: Optional[Sequence[str]] = None,
    device: str = "cpu",
    output_dir: Optional[str] = None,
    mode: str = "vbench_standard",
    name: str = "opensora_duca",
) -> dict:
    """Score ``videos_dir`` with the genuine VBench code, one dimension at a time.

    Dimensions whose weights are missing from ``weights_dir`` are skipped and listed under
    ``skipped_missing_weights``; a dimension that raises is listed under ``failed`` with the error.
    ``mode`` is ``"vbench_standard"`` (files ``{prompt}-{i}.mp4`` for the suite prompts) or
    ``"custom_input"`` (prompt read from each file name; not all dimensions support it)."""
    if mode not in ("vbench_standard", "custom_input"):
        raise ValueError(f"mode must be 'vbench_standard' or 'custom_input', got {mode!r}")
    if not os.path.isdir(videos_dir):
        raise FileNotFoundError(f"video folder not found: {videos_dir}")
    weights_dir = os.path.abspath(weights_dir)
    output_dir = os.path.abspath(output_dir or os.path.join(videos_dir, "..", "vbench_results"))
    os.makedirs(output_dir, exist_ok=True)

    vb = import_vbench(cache_dir=weights_dir)
    import torch

    runnable, missing = plan_dimensions(dimensions, weights_dir)
    stage_dir = os.path.join(output_dir, f"_{name}_videos")
    staged, rejected = _stage_videos(videos_dir, stage_dir)
    result = {
        "videos_dir": os.path.abspath(videos_dir),
        "weights_dir": weights_dir,
        "output_dir": output_dir,
        "mode": mode,
        "device": device,
        "num_videos": len(staged),
        "not_evaluated_files": rejected,
        "missing_videos": {},
        "dimensions": {},
        "skipped_missing_weights": missing,
        "failed": {},
        "notes": {d: EXTRA_NOTES[d] for d in runnable if d in EXTRA_NOTES},
    }
    if not staged:
        raise FileNotFoundError(f"no complete .mp4 videos in {videos_dir}")
    full_info = full_info_json_path()
    staged_set = set(staged)
    for dim in runnable:
        if mode == "vbench_standard":
            exp = expected_videos([dim], full_info_path=full_info)
            miss = [n for n in exp if n not in staged_set]
            result["missing_videos"][dim] = {
                "expected": len(exp),
                "missing": len(miss),
                "examples": miss[:5],
            }
        run_name = f"{name}_{dim}"
        try:
            bench = vb.VBench(torch.device(device), full_info, output_dir)
            bench.evaluate(
                videos_path=stage_dir, name=run_name, dimension_list=[dim], mode=mode, local=True
            )
            with open(
                os.path.join(output_dir, f"{run_name}_eval_results.json"), "r", encoding="utf-8"
            ) as f:
                res = json.load(f)[dim]
            raw = float(res[0])
            per_video = res[1] if len(res) > 1 else []
            result["dimensions"][dim] = {
                "raw": raw,
                "normalized": 100.0 * normalize_score(dim, raw),
                "num_videos": len(per_video),
            }
        except Exception as e:  # report per dimension, keep going
            result["failed"][dim] = f"{type(e).__name__}: {e}"
    result["summary"] = final_scores({d: v["raw"] for d, v in result["dimensions"].items()})
    return result


__all__ = [
    "ALL_DIMENSIONS",
    "QUALITY_DIMENSIONS",
    "SEMANTIC_DIMENSIONS",
    "NORMALIZE_MIN_MAX",
    "DIMENSION_WEIGHT",
    "REQUIRED_FILES",
    "INSTALL_HINT",
    "VBenchUnavailable",
    "ensure_torchvision_importable",
    "import_vbench",
    "vbench_package_dir",
    "full_info_json_path",
    "load_full_info",
    "load_prompts",
    "video_filename",
    "GenerationJob",
    "sample_seed",
    "list_jobs",
    "shard",
    "normalize_score",
    "final_scores",
    "missing_files",
    "plan_dimensions",
    "expected_videos",
    "evaluate",
]
