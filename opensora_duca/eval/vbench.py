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
import time
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
# Files under torch.hub's folder (``$TORCH_HOME/hub``, default ``~/.cache/torch/hub``): the DINO
# repository's ``hubconf.py`` ignores VBench's ``dino_model/dino_vitbase16_pretrain.pth`` and loads
# its weights with ``torch.hub.load_state_dict_from_url``, i.e. from this cache (offline: the file
# must be there). VBench itself still insists on its own copy (it downloads it when missing).
HUB_FILES: Dict[str, Tuple[str, ...]] = {
    "subject_consistency": ("checkpoints/dino_vitbase16_pretrain.pth",),
}
# Files in the Hugging Face cache (:func:`hf_hub_cache`, default ``~/.cache/huggingface/hub``),
# as transformers reads them offline: Tag2Text (scene) builds its tokenizer from
# ``bert-base-uncased`` and part of its tag head from that model's weights (``a|b``: either
# file). Not checked for GRiT (object_class, multiple_objects, color, spatial_relationship), whose
# code cannot run here: it also loads the `bert-base-uncased` tokenizer.
HF_REPO = "bert-base-uncased"
HF_FILES: Dict[str, Tuple[str, ...]] = {
    "scene": ("config.json", "vocab.txt", "tokenizer_config.json",
              "model.safetensors|pytorch_model.bin"),
}
EXTRA_NOTES = {
    "object_class": "also needs detectron2 and the HF `bert-base-uncased` tokenizer",
    "multiple_objects": "also needs detectron2 and the HF `bert-base-uncased` tokenizer",
    "color": "also needs detectron2 and the HF `bert-base-uncased` tokenizer",
    "spatial_relationship": "also needs detectron2 and the HF `bert-base-uncased` tokenizer",
    "scene": "reads the Hugging Face cache offline (HF_HUB_OFFLINE=1 is set by the tool)",
}
# The python modules each dimension's VBench module imports beyond vbench's own glue (what
# `pip install --no-deps vbench` leaves out); requirements-vbench.txt pins those that install here.
DIMENSION_MODULES: Dict[str, Tuple[str, ...]] = {
    "subject_consistency": (),
    "background_consistency": ("clip", "ftfy", "regex", "pkg_resources"),
    "temporal_flickering": (),
    "motion_smoothness": ("omegaconf", "imageio"),
    "dynamic_degree": ("easydict", "scipy"),
    "aesthetic_quality": ("clip", "ftfy", "regex", "pkg_resources"),
    "imaging_quality": ("pyiqa", "pandas", "huggingface_hub", "requests", "scipy"),
    "object_class": ("detectron2", "fvcore", "transformers"),
    "multiple_objects": ("detectron2", "fvcore", "transformers"),
    "color": ("detectron2", "fvcore", "transformers"),
    "spatial_relationship": ("detectron2", "fvcore", "transformers"),
    "scene": ("fairscale", "transformers", "tokenizers", "timm"),
    "human_action": ("timm", "clip"),
    "temporal_style": ("clip", "ftfy", "regex"),
    "appearance_style": ("clip", "ftfy", "regex", "pkg_resources"),
    "overall_consistency": ("clip", "ftfy", "regex"),
}
PIP_NAMES = {"clip": "openai-clip", "pkg_resources": "setuptools<81",
             "huggingface_hub": "huggingface-hub"}
# Why the packages of some dimensions are not installed by requirements-vbench.txt.
NOT_INSTALLABLE = {
    "detectron2": "detectron2 is not published on PyPI (only from source / its own wheel "
    "index); its PyPI repackagings are rejected by pip for direct-URL requirements",
    "fairscale": "pip install --no-deps fairscale==0.4.13 transformers==4.33.2 tokenizers==0.13.3",
    "transformers": "pip install --no-deps transformers==4.33.2 tokenizers==0.13.3 (vbench's pin)",
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
def torch_hub_dir() -> str:
    """torch.hub's folder now (``$TORCH_HOME/hub``, default ``~/.cache/torch/hub``)."""
    import torch.hub

    return torch.hub.get_dir()


def hf_hub_cache() -> str:
    """The Hugging Face hub cache folder transformers 4.33 (vbench's pin) reads now: the first set
    of ``$TRANSFORMERS_CACHE``, ``$PYTORCH_TRANSFORMERS_CACHE``, ``$PYTORCH_PRETRAINED_BERT_CACHE``,
    ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub`` (default ``~/.cache/huggingface/hub``)."""
    for var in ("TRANSFORMERS_CACHE", "PYTORCH_TRANSFORMERS_CACHE",
                "PYTORCH_PRETRAINED_BERT_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.abspath(os.path.expanduser(os.environ[var]))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    return os.path.abspath(os.path.join(home, "hub"))


def hf_snapshot_dir(repo: str = HF_REPO, hub_cache: Optional[str] = None) -> str:
    """``{hub cache}/models--{repo}/snapshots/{revision of refs/main}`` (``<revision>`` when the
    cache has no ``refs/main`` for the repo)."""
    base = os.path.join(hub_cache or hf_hub_cache(), "models--" + repo.replace("/", "--"))
    rev = "<revision>"
    try:
        with open(os.path.join(base, "refs", "main"), "r", encoding="utf-8") as f:
            rev = f.read().strip() or rev
    except OSError:
        pass
    return os.path.join(base, "snapshots", rev)


def weight_files(
    dimension: str, cache_dir: str, hub_dir: Optional[str] = None
) -> List[str]:
    """Every file ``dimension`` loads, as absolute paths: under ``cache_dir`` (VBench's
    ``VBENCH_CACHE_DIR``), under torch.hub's folder (``hub_dir``, default :func:`torch_hub_dir`)
    and in the Hugging Face cache. ``a|b`` in a name: either file."""
    if dimension not in REQUIRED_FILES:
        raise ValueError(f"unknown VBench dimension {dimension!r}")
    out = [os.path.join(os.path.abspath(cache_dir), rel) for rel in REQUIRED_FILES[dimension]]
    if HUB_FILES.get(dimension):
        hub = os.path.abspath(hub_dir or torch_hub_dir())
        out += [os.path.join(hub, rel) for rel in HUB_FILES[dimension]]
    if HF_FILES.get(dimension):
        snap = hf_snapshot_dir()
        out += [os.path.join(snap, rel) for rel in HF_FILES[dimension]]
    return out


def _present(path: str) -> bool:
    head, tail = os.path.split(path)
    return any(os.path.isfile(os.path.join(head, alt)) for alt in tail.split("|"))


def missing_files(dimension: str, cache_dir: str, hub_dir: Optional[str] = None) -> List[str]:
    """Files ``dimension`` needs (:func:`weight_files`) that do not exist."""
    return [p for p in weight_files(dimension, cache_dir, hub_dir) if not _present(p)]


def weights_listing(
    dimensions: Sequence[str], cache_dir: str, hub_dir: Optional[str] = None
) -> List[str]:
    """One line per file: ``dimension: path (present|MISSING)``, plus the dimensions that need
    none and the notes about what is not a file here (packages, Hugging Face cache)."""
    lines = []
    for d in dimensions:
        files = weight_files(d, cache_dir, hub_dir)
        if not files:
            lines.append(f"{d}: no weight file")
        for p in files:
            lines.append(f"{d}: {p} ({'present' if _present(p) else 'MISSING'})")
        if d in EXTRA_NOTES:
            lines.append(f"{d}: {EXTRA_NOTES[d]}")
    return lines


def parse_dimensions(values: Optional[Sequence[str]]) -> Tuple[List[str], bool]:
    """``--dimensions`` values: ``None`` or ``["all"]`` is all 16 in VBench's group order (returned
    with ``explicit=False``), otherwise the named ones, in order, without duplicates
    (``explicit=True``). Unknown names raise ValueError naming them."""
    if not values or list(values) == ["all"]:
        return list(ALL_DIMENSIONS), False
    if "all" in values:
        raise ValueError("--dimensions: 'all' cannot be combined with dimension names")
    unknown = [d for d in values if d not in ALL_DIMENSIONS]
    if unknown:
        raise ValueError(
            f"--dimensions: unknown VBench dimension(s) {unknown}; accepted: all or any of "
            f"{' '.join(ALL_DIMENSIONS)}"
        )
    return list(dict.fromkeys(values)), True


def dimension_import_error(dimension: str, cache_dir: Optional[str] = None) -> Optional[str]:
    """Why VBench's module for ``dimension`` cannot be used here (None when it can).

    First the python modules it needs are looked up without importing them; then, when every
    weight file under ``cache_dir`` is present (some vbench modules start a download at import
    when a file is missing, e.g. ViCLIP's tokenizer), the module is imported. Call after
    :func:`import_vbench`."""
    absent = [m for m in DIMENSION_MODULES.get(dimension, ())
              if importlib.util.find_spec(m) is None]
    if absent:
        names = ", ".join(PIP_NAMES.get(m, m) for m in absent)
        why = "; ".join(NOT_INSTALLABLE[m] for m in absent if m in NOT_INSTALLABLE)
        return f"needs the python package(s) {names}, not installed" + (f" ({why})" if why
                                                                           else "")
    if cache_dir is not None and missing_files(dimension, cache_dir):
        return None  # not imported: the weights check reports the missing files
    try:
        importlib.import_module(f"vbench.{dimension}")
    except Exception as e:  # ImportError mostly; any failure makes the dimension unusable
        return f"importing vbench.{dimension} failed: {type(e).__name__}: {e}"
    return None


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


def _video_fps(path: str) -> float:
    import cv2

    cap = cv2.VideoCapture(path)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    finally:
        cap.release()
    return fps if fps > 0 else 8.0


def _upscaled(frames, min_size: int):
    """Frames scaled by the smallest integer factor that makes the short side >= ``min_size``
    (nearest neighbour: each pixel becomes a block, nothing is invented)."""
    import numpy as np

    h, w = frames.shape[1:3]
    k = max(1, -(-int(min_size) // min(h, w)))
    return np.repeat(np.repeat(frames, k, axis=1), k, axis=2) if k > 1 else frames


def _stage_videos(
    videos_dir: str, stage_dir: str, min_size: Optional[int] = None
) -> Tuple[List[str], List[str]]:
    """Link complete videos into ``stage_dir`` (VBench lists the folder and takes the extension of
    the first entry, so stray temporary / non-video files must not be there). With ``min_size``, a
    video whose short side is smaller is staged as a nearest-neighbour upscaled copy instead (RAFT
    and AMT need at least 64 pixels). Returns (staged, not staged)."""
    from opensora_duca.utils.atomic import is_temp_name
    from opensora_duca.utils.video import is_complete_video, read_video, save_video

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
        frames = read_video(src) if min_size else None
        if frames is not None and min(frames.shape[1:3]) < int(min_size):
            save_video(_upscaled(frames, min_size), dst, fps=_video_fps(src))
        else:
            try:
                os.symlink(os.path.abspath(src), dst)
            except OSError:
                shutil.copy2(src, dst)
        staged.append(name)
    return staged, rejected


def video_sizes(videos_dir: str) -> Dict[str, Tuple[int, int]]:
    """``{name: (height, width)}`` of the complete .mp4 files of ``videos_dir`` (first frame)."""
    import cv2

    from opensora_duca.utils.atomic import is_temp_name

    out = {}
    for name in sorted(os.listdir(videos_dir)):
        path = os.path.join(videos_dir, name)
        if not name.lower().endswith(".mp4") or is_temp_name(name) or not os.path.isfile(path):
            continue
        cap = cv2.VideoCapture(path)
        try:
            ok, frame = cap.read()
        finally:
            cap.release()
        if ok:
            out[name] = tuple(frame.shape[:2])
    return out


# VBench's custom_input mode (prompt read from the file name) cannot score these: they need the
# suite's auxiliary information (object, colour, scene, style of each prompt).
CUSTOM_UNSUPPORTED = ("object_class", "multiple_objects", "scene", "appearance_style", "color",
                      "spatial_relationship")

# RAFT (dynamic_degree) and AMT (motion_smoothness) build 4-level pyramids at 1/8 resolution.
MIN_SIDE = {"dynamic_degree": 64, "motion_smoothness": 64}


def expected_videos(
    dimensions: Sequence[str], num_samples: int = 5, full_info_path: Optional[str] = None
) -> List[str]:
    """File names VBench's standard mode looks for, for these dimensions."""
    prompts = load_prompts(dimensions=dimensions, full_info_path=full_info_path)
    return [video_filename(p, i) for p in prompts for i in range(num_samples)]


def videos_fingerprint(videos_dir: str, min_size: Optional[int] = None) -> dict:
    """What a stored per-dimension result was computed from: the complete video files (name, size,
    modification time) and the staging option. A result is reused only when this is unchanged."""
    from opensora_duca.utils.atomic import is_temp_name

    files = []
    for name in sorted(os.listdir(videos_dir)):
        path = os.path.join(videos_dir, name)
        if name.lower().endswith(".mp4") and not is_temp_name(name) and os.path.isfile(path):
            st = os.stat(path)
            files.append([name, st.st_size, st.st_mtime_ns])
    return {"files": files, "min_size": min_size}


def result_path(output_dir: str, name: str, dimension: str) -> str:
    """This project's per-dimension result file (VBench's own is ``{name}_{dim}_eval_results``)."""
    return os.path.join(output_dir, f"{name}_{dimension}_result.json")


def weights_fingerprint(dimension: str, cache_dir: str) -> List[list]:
    """``[path, size, modification time]`` of the weight files ``dimension`` loads (absent ones
    with None): a stored score is reused only while these are unchanged."""
    out = []
    for p in weight_files(dimension, cache_dir):
        head, tail = os.path.split(p)
        for alt in tail.split("|"):
            q = os.path.join(head, alt)
            if os.path.isfile(q):
                st = os.stat(q)
                out.append([q, st.st_size, st.st_mtime_ns])
                break
        else:
            out.append([p, None, None])
    return out


def load_result(output_dir: str, name: str, dimension: str, fingerprint: dict,
                mode: str, weights: Optional[List[list]] = None) -> Optional[dict]:
    """The stored result of ``dimension`` when it was computed from the same videos in the same
    mode (and, given ``weights``, with the same weight files): a score or an error; else None."""
    path = result_path(output_dir, name, dimension)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != fingerprint or rec.get("mode") != mode:
        return None
    if weights is not None and rec.get("weights") != weights:
        return None
    return rec


def evaluate(
    videos_dir: str,
    weights_dir: str,
    dimensions: Optional[Sequence[str]] = None,
    device: str = "cpu",
    output_dir: Optional[str] = None,
    mode: str = "vbench_standard",
    name: str = "opensora_duca",
    resume: bool = True,
    min_size: Optional[int] = None,
    compute: bool = True,
) -> dict:
    """Score ``videos_dir`` with the genuine VBench code, one dimension at a time.

    Dimensions whose weights are missing from ``weights_dir`` are skipped and listed under
    ``skipped_missing_weights``; a dimension that raises is listed under ``failed`` with the error.
    ``mode`` is ``"vbench_standard"`` (files ``{prompt}-{i}.mp4`` for the suite prompts) or
    ``"custom_input"`` (prompt read from each file name; not all dimensions support it).

    Each dimension's outcome is stored in ``{output_dir}/{name}_{dim}_result.json`` with the
    :func:`videos_fingerprint` and :func:`weights_fingerprint` it was computed from; with
    ``resume`` a stored score of the same videos and weights is reused (listed under
    ``resumed``), so an interrupted evaluation goes on where it stopped and several processes
    can share the dimensions of one folder. With ``compute=False``
    nothing is scored: stored results are collected, dimensions without one are listed under
    ``pending`` and stored failures under ``failed``.
    ``min_size``: stage videos whose short side is smaller as upscaled copies (see
    :func:`_stage_videos`)."""
    from opensora_duca.utils.atomic import write_json

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
    fingerprint = videos_fingerprint(videos_dir, min_size)
    result = {
        "videos_dir": os.path.abspath(videos_dir),
        "weights_dir": weights_dir,
        "output_dir": output_dir,
        "mode": mode,
        "device": device,
        "num_videos": len(fingerprint["files"]),
        "not_evaluated_files": [],
        "missing_videos": {},
        "dimensions": {},
        "skipped_missing_weights": missing,
        "failed": {},
        "resumed": [],
        "pending": [],
        "notes": {d: EXTRA_NOTES[d] for d in runnable if d in EXTRA_NOTES},
    }
    todo = []
    wfp = {dim: weights_fingerprint(dim, weights_dir) for dim in runnable}
    for dim in runnable:
        rec = load_result(output_dir, name, dim, fingerprint, mode, wfp[dim]) if resume else None
        if rec is not None and "raw" in rec:
            result["dimensions"][dim] = {k: rec[k] for k in ("raw", "normalized", "num_videos")}
            result["resumed"].append(dim)
        elif not compute:
            if rec is not None and "error" in rec:
                result["failed"][dim] = rec["error"]
            else:
                result["pending"].append(dim)
        else:
            todo.append(dim)
    if not compute:
        result["num_videos"] = len(fingerprint["files"])
        result["summary"] = final_scores({d: v["raw"] for d, v in result["dimensions"].items()})
        return result
    stage_dir = os.path.join(output_dir, f"_{name}_videos.{os.getpid()}")
    staged, rejected = _stage_videos(videos_dir, stage_dir, min_size)
    result["num_videos"] = len(staged)
    result["not_evaluated_files"] = rejected
    if not staged:
        shutil.rmtree(stage_dir, ignore_errors=True)
        raise FileNotFoundError(f"no complete .mp4 videos in {videos_dir}")
    full_info = full_info_json_path()
    staged_set = set(staged)
    try:
        for dim in runnable:
            if mode == "vbench_standard":
                exp = expected_videos([dim], full_info_path=full_info)
                miss = [n for n in exp if n not in staged_set]
                result["missing_videos"][dim] = {
                    "expected": len(exp),
                    "missing": len(miss),
                    "examples": miss[:5],
                }
            if dim not in todo:
                continue
            run_name = f"{name}_{dim}"
            rec = {"dimension": dim, "mode": mode, "fingerprint": fingerprint,
                   "weights": wfp[dim]}
            t0 = time.perf_counter()
            try:
                bench = vb.VBench(torch.device(device), full_info, output_dir)
                bench.evaluate(
                    videos_path=stage_dir, name=run_name, dimension_list=[dim], mode=mode,
                    local=True,
                )
                with open(
                    os.path.join(output_dir, f"{run_name}_eval_results.json"), "r",
                    encoding="utf-8",
                ) as f:
                    res = json.load(f)[dim]
                raw = float(res[0])
                per_video = res[1] if len(res) > 1 else []
                rec.update(raw=raw, normalized=100.0 * normalize_score(dim, raw),
                           num_videos=len(per_video))
                result["dimensions"][dim] = {
                    k: rec[k] for k in ("raw", "normalized", "num_videos")
                }
            except Exception as e:  # report per dimension, keep going
                rec["error"] = f"{type(e).__name__}: {e}"
                result["failed"][dim] = rec["error"]
            rec["seconds"] = time.perf_counter() - t0  # model loading included
            write_json(result_path(output_dir, name, dim), rec)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
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
    "HUB_FILES",
    "HF_REPO",
    "HF_FILES",
    "hf_hub_cache",
    "hf_snapshot_dir",
    "DIMENSION_MODULES",
    "PIP_NAMES",
    "NOT_INSTALLABLE",
    "torch_hub_dir",
    "weight_files",
    "missing_files",
    "weights_listing",
    "parse_dimensions",
    "dimension_import_error",
    "plan_dimensions",
    "video_sizes",
    "MIN_SIDE",
    "CUSTOM_UNSUPPORTED",
    "videos_fingerprint",
    "result_path",
    "weights_fingerprint",
    "load_result",
    "expected_videos",
    "evaluate",
]
