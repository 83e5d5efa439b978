"""Load Open-Sora-style checkpoints from a local path: a ``.safetensors`` file, a ``.pt`` /
``.pth`` / ``.bin`` state dict (optionally wrapped in ``state_dict``/``model``/``module`` and
with ``module.`` prefixes), or an HF-style folder holding ``model.safetensors`` or
``pytorch_model.bin``. Nothing is downloaded. Keys under ``text_encoder.`` (a bundle such as the
shipped demo checkpoint, which also holds its text encoder) are left to the text encoder."""
from __future__ import annotations

import os
from typing import Dict, List

import torch

BUNDLE_PREFIXES = ("text_encoder.",)
_FOLDER_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                 "model.pt", "ema.pt")


def resolve_checkpoint_path(path: str) -> str:
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        for name in _FOLDER_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError(f"checkpoint folder {path!r} holds none of {list(_FOLDER_FILES)}")
    if os.path.isfile(path):
        return path
    hint = ""
    if not path.startswith(("/", ".", "~")) and path.count("/") == 1:
        hint = (f" {path!r} looks like a hub id: nothing is downloaded at run time, so download "
                f"it first (e.g. huggingface-cli download {path} --local-dir DIR) and pass DIR")
    raise FileNotFoundError(f"checkpoint path {path!r} does not exist.{hint}")


def checkpoint_keys(path: str) -> List[str]:
    """The model's tensor names in a checkpoint, as :func:`read_state_dict` names them (a
    .safetensors file's header only; other formats are read with ``weights_only=True``)."""
    resolved = resolve_checkpoint_path(path)
    if resolved.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(resolved, framework="pt") as f:
            return list(_model_entries(dict.fromkeys(f.keys())))
    return list(read_state_dict(resolved))


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    path = resolve_checkpoint_path(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "module", "ema"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {path!r} does not hold a state dict (got "
                         f"{type(sd).__name__})")
    return _model_entries(sd)


def _model_entries(sd: dict) -> dict:
    """The model's entries of a checkpoint's name -> value dict, under the model's names."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if any(k.startswith("model.") for k in sd):  # a bundle with prefixed model keys
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    # the shipped demo bundle keeps the demo text encoder's weights under "text_encoder."
    # in the same file; they belong to DemoTextEncoder(from_pretrained=...), not to the model
    return {k: v for k, v in sd.items() if not k.startswith(BUNDLE_PREFIXES)}


class CheckpointMismatchError(ValueError, RuntimeError):
    """A checkpoint that does not fit the model (keys, shapes or dtypes); one line. A
    ``ValueError`` (a user error: the tools report it in one line, exit code 2) and, as before,
    a ``RuntimeError``."""


def _fmt(keys):
    return ", ".join(keys[:20]) + (f" ... ({len(keys)} in all)" if len(keys) > 20 else "")


def check_dtypes(path: str, sd: dict, own: dict) -> None:
    """A floating-point parameter or buffer must get floating-point values (integer or bool
    tensors, a casting accident or no weights at all, would be cast silently), and no NaN."""
    bad = sorted(k for k in set(own) & set(sd) if own[k].is_floating_point()
                 and isinstance(sd[k], torch.Tensor) and not sd[k].is_floating_point())
    if bad:
        raise CheckpointMismatchError(
            f"checkpoint {path!r} holds non-floating-point values for floating-point weights "
            f"({_fmt([f'{k} {sd[k].dtype}'.replace('torch.', '') for k in bad])}); accepted: "
            f"float32 / float16 / bfloat16 tensors")
    nan = sorted(k for k in set(own) & set(sd) if isinstance(sd[k], torch.Tensor)
                 and sd[k].is_floating_point() and bool(torch.isnan(sd[k]).any()))
    if nan:
        raise CheckpointMismatchError(
            f"checkpoint {path!r} holds NaN values in {_fmt(nan)} (every output would be NaN); "
            f"accepted: finite weights")


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load strictly: missing or unexpected keys, shape mismatches and integer / bool values
    for floating-point weights raise :class:`CheckpointMismatchError` (one line) with the
    names."""
    path = resolve_checkpoint_path(path)
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or bad:
        lines = [f"checkpoint {path!r} does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"missing keys: {_fmt(missing)};")
        if unexpected:
            lines.append(f"unexpected keys: {_fmt(unexpected)};")
        if bad:
            lines.append("shape mismatches: " + _fmt(
                [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in bad]) + ";")
        if any(k.startswith("x_embedder_cond") for k in unexpected):
            lines.append("(an Open-Sora 1.3 checkpoint: build STDiT3 with in_channels=16, "
                         "cond_embedders=True and the run's kernel_size / use_spatial_rope, "
                         "as configs/opensora-v1-3/inference/sample.py does)")
        lines.append("accepted: a checkpoint of this model's configuration")
        raise CheckpointMismatchError(" ".join(lines))
    check_dtypes(path, sd, own)
    _check_recorded_options(model, path)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


#: model options that change the output but add no weights, so a state dict cannot reveal them
PARAMETER_FREE_OPTIONS = ("temporal_pos_embed",)


def _check_recorded_options(model: torch.nn.Module, path: str) -> None:
    """For a .safetensors file (resolved ``path``) exported by ``tools/train.py`` (metadata
    ``config`` = JSON with a ``model`` entry): the parameter-free options it records (missing =
    the class default, off) must match the model's, else the weights load fine and the outputs
    are silently wrong."""
    if not path.endswith(".safetensors"):
        return
    import json

    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    try:
        recorded = json.loads(meta["config"])["model"]
    except (KeyError, TypeError, ValueError):
        return  # not one of our exports: nothing recorded
    for key in PARAMETER_FREE_OPTIONS:
        if not hasattr(model, key):
            continue
        want = bool(recorded.get(key, False))
        have = getattr(model, key) is not None
        if want != have:
            raise ValueError(
                f"checkpoint {path!r} was trained with model option {key}={want}, but the model "
                f"was built with {key}={have}; accepted: the same value (set model.{key}={want} "
                "in the config)")
