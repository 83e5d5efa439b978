"""Stand-in weights for the networks VBench 0.1.5 loads, built at test time (never committed).

Every file is written where VBench (or the library it calls) looks for it, under a VBench cache
folder (``VBENCH_CACHE_DIR``) and a torch hub folder (``TORCH_HOME``), with the architecture the
loading code builds and random parameters. The scores computed with them are meaningless; what
they exercise is the real plumbing: VBench's frame sampling, preprocessing, model construction,
checkpoint loading and scoring code, and this project's aggregation.

- background_consistency, appearance_style: ``clip_model/ViT-B-32.pt``, a TorchScript archive of
  OpenAI-CLIP (patch 32, 224 px, embed 512) with 64-wide 1-layer towers (``clip.load`` reads every
  size from the archive's state dict);
- aesthetic_quality: ``clip_model/ViT-L-14.pt`` (patch 14, 224 px, embed 768, tiny towers) and
  ``aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth`` (``nn.Linear(768, 1)``);
- subject_consistency: ``dino_model/facebookresearch_dino_main/hubconf.py``, a stand-in for the
  DINO repository clone with its own tiny patch-16 ViT behind ``dino_vitb16``, which loads its
  weights like the real one from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints/dino_vitbase16_pretrain.pth``); VBench also insists on
  ``dino_model/dino_vitbase16_pretrain.pth``;
- motion_smoothness: ``amt_model/amt-s.pth``, AMT-S built from VBench's own ``AMT-S.yaml`` (full
  size, 3 M parameters);
- dynamic_degree: ``raft_model/models/raft-things.pth``, VBench's RAFT (full size, 5 M
  parameters), keys prefixed ``module.`` like the released file;
- imaging_quality: ``pyiqa_model/musiq_spaq_ckpt-358bb6af.pth``, pyiqa's MUSIQ at its default size;
- temporal_style, overall_consistency: ``ViCLIP/ViClip-InternVid-10M-FLT.pth`` (``{"model": state
  dict}``) and ``ViCLIP/bpe_simple_vocab_16e6.txt.gz`` (the CLIP BPE file, copied from the
  installed ``clip`` package);
- human_action: ``umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth``, UMT's video ViT, 400 classes;
- scene: ``caption_model/tag2text_swin_14m.pth`` (``{"model": state dict}`` of VBench's
  Tag2Text captioner: Swin-B at 384 px, BERT tag encoder and caption decoder) and, in the Hugging
  Face cache (``$HUGGINGFACE_HUB_CACHE``), ``models--bert-base-uncased`` with a generated WordPiece
  vocabulary of 30522 entries (the special tokens at BERT's ids, filler words elsewhere), its
  configs and ``model.safetensors`` holding the layers Tag2Text loads from it;
- temporal_flickering: nothing.

GRiT (object_class, multiple_objects, color, spatial_relationship) is not built: its code needs
detectron2, which cannot be installed here (see ``docs/evaluation.md``).

ViCLIP, UMT and Tag2Text are ViT-L/14, ViT-L/16 and Swin-B + BERT-base networks whose sizes
VBench's code fixes (``clip_joint_l14``, ``clip_text_l14``, the timm entry
``vit_large_patch16_224``, Tag2Text's JSON configs); on one CPU core one video through any of
them takes about a minute. ``scale="tiny"`` builds them 64 wide (BERT: 768 wide, as Tag2Text's
code requires, 1 layer) and 1 layer deep and :func:`tiny_fixed_architectures` makes VBench's code
build the same tiny shapes (the same classes, only the width/depth arguments and config values
change) for an in-process run; ``scale="full"`` builds them at the size VBench builds, for a run
of the unmodified tool in a subprocess.

Run as a script to build a folder for a manual run::

    python tests/vbench_standins.py OUT_DIR [--full]

which writes ``OUT_DIR/vbench_cache`` (pass it as ``--weights-dir``), ``OUT_DIR/torch_home``
(export it as ``TORCH_HOME``) and ``OUT_DIR/hf_hub`` (export it as ``HUGGINGFACE_HUB_CACHE``).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import json
import os
import shutil
import sys
from typing import Dict, Iterator, List

import torch
from torch import nn

from opensora_duca.eval import vbench as vb  # the package installed (make setup: pip -e .)

DINO_URL_NAME = "dino_vitbase16_pretrain.pth"  # the file name of the URL the DINO hubconf loads
TINY = dict(width=64, layers=1, heads=1)

# The stand-in hubconf.py of the DINO repository clone: a tiny patch-16 ViT (class token output,
# like DINO's ``num_classes=0`` model), weights loaded through torch.hub's cache as the real
# hubconf does. Written at test time.
_DINO_HUBCONF = '''"""Stand-in for the facebookresearch/dino clone (tests/vbench_standins.py)."""
import torch
from torch import nn

dependencies = ["torch"]


class TinyViT(nn.Module):
    def __init__(self, patch_size=16, img_size=224, width=64, depth=1, heads=1):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        n = (img_size // patch_size) ** 2 + 1
        self.pos_embed = nn.Parameter(torch.randn(1, n, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, 0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        n = min(x.shape[1], self.pos_embed.shape[1])
        x = x[:, :n] + self.pos_embed[:, :n]
        return self.norm(self.blocks(x))[:, 0]


def dino_vitb16(pretrained=True, **kwargs):
    model = TinyViT(patch_size=16)
    if pretrained:
        state_dict = torch.hub.load_state_dict_from_url(
            url="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
            map_location="cpu",
        )
        model.load_state_dict(state_dict, strict=True)
    return model
'''


def _vbench(cache_dir: str):
    """Import vbench with ``cache_dir`` as VBENCH_CACHE_DIR: some of its modules read the folder
    once, at import (ViCLIP's tokenizer path is a default argument), so this must come first."""
    return vb.import_vbench(cache_dir=cache_dir)


# --------------------------------------------------------------------------------------------------
# the fixed-size architectures, tiny
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tiny_fixed_architectures(cache_dir: str) -> Iterator[None]:
    """While active, VBench's ViCLIP and UMT constructors build 64-wide, 1-layer networks of the
    same classes (ViCLIP's ``VisionTransformer`` / ``CLIP_TEXT``, UMT's ``VisionTransformer``)
    instead of ViT-L; everything else (input sizes, frame counts, output dimensions, the class
    count, the loading and scoring code) is unchanged. ``cache_dir``: the VBench cache folder of
    the run (vbench is imported with it)."""
    _vbench(cache_dir)
    from functools import partial

    import timm.models._registry as reg
    import vbench.human_action  # noqa: F401  (registers UMT's vit_large_patch16_224 with timm)
    import vbench.third_party.umt.models.modeling_finetune as umt
    import vbench.third_party.ViCLIP.viclip as vc
    import vbench.third_party.ViCLIP.viclip_text as vt
    import vbench.third_party.ViCLIP.viclip_vision as vv

    def vision(pretrained=False, input_resolution=224, kernel_size=1, center=True, num_frames=8,
               drop_path=0.0, checkpoint_num=0, dropout=0.0):
        return vv.VisionTransformer(
            input_resolution=input_resolution, patch_size=14, width=TINY["width"],
            layers=TINY["layers"], heads=TINY["heads"], output_dim=768, kernel_size=kernel_size,
            num_frames=num_frames, drop_path=drop_path, checkpoint_num=0, dropout=dropout,
        ).eval()

    def text(embed_dim=768, context_length=77, vocab_size=49408, transformer_width=768,
             transformer_heads=12, transformer_layers=12, checkpoint_num=0, pretrained=True):
        return vt.CLIP_TEXT(embed_dim, context_length, vocab_size, TINY["width"], TINY["heads"],
                            TINY["layers"], 0).eval()

    def umt_vit(pretrained=False, **kwargs):
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        return umt.VisionTransformer(
            patch_size=16, embed_dim=TINY["width"], depth=TINY["layers"], num_heads=TINY["heads"],
            mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)

    saved = (vc.clip_joint_l14, vc.clip_text_l14, reg._model_entrypoints["vit_large_patch16_224"])
    vc.clip_joint_l14, vc.clip_text_l14 = vision, text
    reg._model_entrypoints["vit_large_patch16_224"] = umt_vit
    t2t = None
    if importlib.util.find_spec("fairscale") and importlib.util.find_spec("transformers"):
        import vbench.third_party.tag2Text.tag2text as t2t

        conf = _tiny_tag2text_configs(cache_dir)
        t2t_saved = (t2t.CUR_DIR, t2t.Tag2Text_Caption.__init__.__defaults__)
        t2t.CUR_DIR = conf
        t2t.Tag2Text_Caption.__init__.__defaults__ = (
            os.path.join(conf, "med_config.json"),) + t2t_saved[1][1:]
    try:
        yield
    finally:
        vc.clip_joint_l14, vc.clip_text_l14 = saved[0], saved[1]
        reg._model_entrypoints["vit_large_patch16_224"] = saved[2]
        if t2t is not None:
            t2t.CUR_DIR, t2t.Tag2Text_Caption.__init__.__defaults__ = t2t_saved


def _tiny_tag2text_configs(cache_dir: str) -> str:
    """Tag2Text's three JSON configs, small: Swin 16 wide with 1 block per stage (384 px, window
    12 as VBench's), BERT 1 layer with the tiny stand-in vocabulary (:data:`TINY_BERT_VOCAB`
    words, + 2 added tokens for the caption decoder). The BERT hidden size 768, which
    Tag2Text's code hard-wires, stays."""
    src = os.path.join(vb.vbench_package_dir(), "third_party", "tag2Text")
    dst = os.path.join(cache_dir, "_standin_tag2text_tiny_configs")
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config_swinB_384.json"), encoding="utf-8") as f:
        swin = json.load(f)
    swin.update(embed_dim=16, vision_width=128, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1])
    with open(os.path.join(dst, "config_swinB_384.json"), "w", encoding="utf-8") as f:
        json.dump(swin, f)
    for name, vocab in (("med_config.json", TINY_BERT_VOCAB + 2),
                        ("q2l_config.json", TINY_BERT_VOCAB)):
        with open(os.path.join(src, name), encoding="utf-8") as f:
            cfg = json.load(f)
        cfg.update(num_hidden_layers=1, num_attention_heads=1, intermediate_size=64,
                   vocab_size=vocab)
        with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
            json.dump(cfg, f)
    return dst


# --------------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------------
def _finite(state_dict: dict, fill_empty: bool = False) -> dict:
    """Some constructors leave parameters as ``torch.empty`` for the checkpoint to fill (ViCLIP's
    projections and positional embeddings): give those defined random values. Such memory holds
    anything: non-finite or huge values, and (``fill_empty``, for those constructors) all but
    zero ones, whose features vanish below float range and normalise to NaN."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, v in state_dict.items():
        if torch.is_floating_point(v) and v.numel() and (
                not torch.isfinite(v).all() or v.abs().max() > 1e4
                or (fill_empty and v.abs().max() < 1e-12)):
            v = torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.02
        out[k] = v
    return out


def _save(obj, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(obj, dict) and "model" in obj:
        obj = dict(obj, model=_finite(obj["model"]))
    elif isinstance(obj, dict) and "state_dict" in obj:
        obj = dict(obj, state_dict=_finite(obj["state_dict"]))
    elif isinstance(obj, dict):
        obj = _finite(obj)
    torch.save(obj, path)
    return path


def _clip_archive(embed_dim: int, patch: int, path: str) -> str:
    """A TorchScript archive like OpenAI's released files (``clip.load`` opens the file with
    ``torch.jit.load`` and rebuilds the model from the archive's state dict, reading every size
    from it)."""
    from clip.model import CLIP

    w = TINY["width"]  # clip's build_model derives the head count as width // 64
    model = CLIP(embed_dim, 224, TINY["layers"], w, patch, 77, 49408, w, w // 64,
                 TINY["layers"]).eval()
    example = (torch.zeros(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long))
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.jit.save(traced, path)
    return path


def build_clip(cache_dir: str) -> List[str]:
    return [
        _clip_archive(512, 32, os.path.join(cache_dir, "clip_model", "ViT-B-32.pt")),
        _clip_archive(768, 14, os.path.join(cache_dir, "clip_model", "ViT-L-14.pt")),
    ]


def build_aesthetic(cache_dir: str) -> List[str]:
    head = nn.Linear(768, 1)
    path = os.path.join(cache_dir, "aesthetic_model", "emb_reader", "sa_0_4_vit_l_14_linear.pth")
    return [_save(head.state_dict(), path)]


def build_dino(cache_dir: str, torch_home: str) -> List[str]:
    repo = os.path.join(cache_dir, "dino_model", "facebookresearch_dino_main")
    os.makedirs(repo, exist_ok=True)
    hubconf = os.path.join(repo, "hubconf.py")
    with open(hubconf, "w", encoding="utf-8") as f:
        f.write(_DINO_HUBCONF)
    namespace = {"__name__": "_standin_dino_hubconf"}  # the text written above, run here
    exec(compile(_DINO_HUBCONF, hubconf, "exec"), namespace)
    sd = namespace["dino_vitb16"](pretrained=False).state_dict()
    return [
        hubconf,
        _save(sd, os.path.join(torch_home, "hub", "checkpoints", DINO_URL_NAME)),
        _save(sd, os.path.join(cache_dir, "dino_model", DINO_URL_NAME)),
    ]


def build_amt(cache_dir: str) -> List[str]:
    _vbench(cache_dir)
    from omegaconf import OmegaConf
    from vbench.third_party.amt.utils.build_utils import build_from_cfg

    cfg = os.path.join(vb.vbench_package_dir(), "third_party", "amt", "cfgs", "AMT-S.yaml")
    model = build_from_cfg(OmegaConf.load(cfg).network)
    return [_save({"state_dict": model.state_dict()}, os.path.join(cache_dir, "amt_model",
                                                                   "amt-s.pth"))]


def build_raft(cache_dir: str) -> List[str]:
    _vbench(cache_dir)
    from easydict import EasyDict
    from vbench.third_party.RAFT.core.raft import RAFT

    model = RAFT(EasyDict(small=False, mixed_precision=False, alternate_corr=False))
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    return [_save(sd, os.path.join(cache_dir, "raft_model", "models", "raft-things.pth"))]


def build_musiq(cache_dir: str) -> List[str]:
    _vbench(cache_dir)
    from pyiqa.archs.musiq_arch import MUSIQ

    model = MUSIQ(pretrained=False)
    return [_save(model.state_dict(), os.path.join(cache_dir, "pyiqa_model",
                                                   "musiq_spaq_ckpt-358bb6af.pth"))]


def _copy_bpe(cache_dir: str) -> str:
    spec = importlib.util.find_spec("clip")  # found, not imported (it imports torchvision)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the clip package (pip: openai-clip) is needed for its BPE file")
    src = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(src) as f:  # a readable gzip file, not a stray name
        f.read(16)
    dst = os.path.join(cache_dir, "ViCLIP", "bpe_simple_vocab_16e6.txt.gz")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def build_viclip(cache_dir: str, scale: str = "tiny") -> List[str]:
    bpe = _copy_bpe(cache_dir)
    _vbench(cache_dir)
    from vbench.third_party.ViCLIP.simple_tokenizer import SimpleTokenizer
    from vbench.third_party.ViCLIP.viclip import ViCLIP

    ctx = tiny_fixed_architectures(cache_dir) if scale == "tiny" else contextlib.nullcontext()
    with ctx:
        model = ViCLIP(tokenizer=SimpleTokenizer(bpe), pretrain=None)
    path = os.path.join(cache_dir, "ViCLIP", "ViClip-InternVid-10M-FLT.pth")
    return [bpe, _save({"model": _finite(model.state_dict(), fill_empty=True)}, path)]


def build_umt(cache_dir: str, scale: str = "tiny") -> List[str]:
    _vbench(cache_dir)
    from timm.models import create_model

    ctx = tiny_fixed_architectures(cache_dir) if scale == "tiny" else contextlib.nullcontext()
    with ctx:
        import vbench.human_action  # noqa: F401  (registers the UMT model with timm)

        # the arguments vbench.human_action passes
        model = create_model("vit_large_patch16_224", pretrained=False, num_classes=400,
                             all_frames=16, tubelet_size=1, use_learnable_pos_emb=False,
                             fc_drop_rate=0.0, drop_rate=0.0, drop_path_rate=0.2,
                             attn_drop_rate=0.0, drop_block_rate=None, use_checkpoint=False,
                             checkpoint_num=16, use_mean_pooling=True, init_scale=0.001)
    path = os.path.join(cache_dir, "umt_model", "l16_ptk710_ftk710_ftk400_f16_res224.pth")
    return [_save(model.state_dict(), path)]


def use_hf_cache(hf_cache: str) -> None:
    """Point the Hugging Face libraries at ``hf_cache``, offline: through the environment, and,
    for a process that imported them already (they read it once), their module constants."""
    hf_cache = os.path.abspath(hf_cache)
    os.environ.update(HF_HUB_CACHE=hf_cache, HUGGINGFACE_HUB_CACHE=hf_cache, HF_HUB_OFFLINE="1",
                      TRANSFORMERS_OFFLINE="1")
    for var in ("TRANSFORMERS_CACHE", "PYTORCH_TRANSFORMERS_CACHE",
                "PYTORCH_PRETRAINED_BERT_CACHE"):
        os.environ.pop(var, None)
    hh = sys.modules.get("huggingface_hub.constants")
    if hh is not None:
        hh.HF_HUB_CACHE = hh.HUGGINGFACE_HUB_CACHE = hf_cache
        hh.HF_HUB_OFFLINE = True
    th = sys.modules.get("transformers.utils.hub")
    if th is not None:
        for name in ("TRANSFORMERS_CACHE", "PYTORCH_TRANSFORMERS_CACHE",
                     "PYTORCH_PRETRAINED_BERT_CACHE", "HUGGINGFACE_HUB_CACHE"):
            if hasattr(th, name):
                setattr(th, name, hf_cache)
        if hasattr(th, "_is_offline_mode"):
            th._is_offline_mode = True


HF_REVISION = "5ba1c0de5ba1c0de5ba1c0de5ba1c0de5ba1c0de"  # refs/main of the stand-in repo


TINY_BERT_VOCAB = 998  # + Tag2Text's 2 added tokens = the tiny decoder's 1000 rows


def _bert_vocab(size: int = 30522) -> List[str]:
    """A WordPiece vocabulary with BERT's special tokens at BERT's ids ([PAD] 0, [UNK] 100,
    [CLS] 101, [SEP] 102, [MASK] 103), single characters, some words and numbered fillers:
    ``size`` entries (30522, as bert-base-uncased and Tag2Text's configs; fewer for the tiny
    configs, whose caption decoder then scores 1000 tokens instead of 30524 at every step)."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]",
                                                              "[MASK]"]
    vocab += list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-|")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += ["a", "picture", "of", "the", "in", "on", "with", "and", "is", "kitchen", "street",
              "beach", "room", "forest", "sky", "water", "person", "car", "dog", "cat"]
    vocab = list(dict.fromkeys(vocab))
    vocab += [f"standin{i}" for i in range(size - len(vocab))]
    return vocab[:size]


def build_hf_bert(hf_cache: str, cache_dir: str, scale: str = "tiny") -> List[str]:
    """``bert-base-uncased`` in the Hugging Face cache layout (refs/main -> snapshots/REV):
    tokenizer files and a BERT encoder with the sizes Tag2Text loads from it (its q2l config,
    without cross-attention, like the released model)."""
    from safetensors.torch import save_file
    from transformers import BertConfig

    _vbench(cache_dir)
    from vbench.third_party.tag2Text.med import BertModel  # the class Tag2Text loads it into

    base = os.path.join(hf_cache, "models--bert-base-uncased")
    snap = os.path.join(base, "snapshots", HF_REVISION)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(base, "refs"), exist_ok=True)
    with open(os.path.join(base, "refs", "main"), "w", encoding="utf-8") as f:
        f.write(HF_REVISION)
    with open(os.path.join(snap, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(_bert_vocab(TINY_BERT_VOCAB if scale == "tiny" else 30522)) + "\n")
    with open(os.path.join(snap, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"do_lower_case": True, "model_max_length": 512}, f)
    conf_dir = (_tiny_tag2text_configs(cache_dir) if scale == "tiny" else
                os.path.join(vb.vbench_package_dir(), "third_party", "tag2Text"))
    cfg = BertConfig.from_json_file(os.path.join(conf_dir, "q2l_config.json"))
    cfg.architectures = ["BertModel"]
    cfg.add_cross_attention = False  # BERT itself has none: Tag2Text adds (and initialises) it
    cfg.to_json_file(os.path.join(snap, "config.json"))
    model = BertModel(cfg, add_pooling_layer=False)
    save_file(_finite({k: v.contiguous() for k, v in model.state_dict().items()}),
              os.path.join(snap, "model.safetensors"), metadata={"format": "pt"})
    return [os.path.join(snap, n) for n in ("vocab.txt", "tokenizer_config.json", "config.json",
                                            "model.safetensors")]


def build_tag2text(cache_dir: str, scale: str = "tiny") -> List[str]:
    """Tag2Text's captioner as VBench's ``tag2text_caption(image_size=384, vit="swin_b")`` builds
    it (needs the ``bert-base-uncased`` stand-in in the Hugging Face cache first)."""
    _vbench(cache_dir)
    from vbench.third_party.tag2Text.tag2text import tag2text_caption

    ctx = tiny_fixed_architectures(cache_dir) if scale == "tiny" else contextlib.nullcontext()
    with ctx:
        model = tag2text_caption(pretrained="", image_size=384, vit="swin_b")
    sd = {k: v for k, v in model.state_dict().items()
          if "relative_position_index" not in k and "attn_mask" not in k}
    return [_save({"model": sd}, os.path.join(cache_dir, "caption_model",
                                              "tag2text_swin_14m.pth"))]


def build_standins(cache_dir: str, torch_home: str, scale: str = "tiny",
                   hf_cache: str | None = None) -> Dict[str, List[str]]:
    """Write every stand-in; returns ``{group: [files]}``. ``torch_home`` is where ``TORCH_HOME``
    must point during the run (the DINO hubconf reads its weights from the torch hub cache),
    ``hf_cache`` where ``HUGGINGFACE_HUB_CACHE`` must (Tag2Text's ``bert-base-uncased``; the scene
    stand-ins are built only with it, and only when transformers and fairscale are installed)."""
    if scale not in ("tiny", "full"):
        raise ValueError(f"scale must be 'tiny' or 'full', got {scale!r}")
    if hf_cache:  # read by huggingface_hub / transformers when they are first imported
        use_hf_cache(hf_cache)
    torch.manual_seed(0)
    os.makedirs(cache_dir, exist_ok=True)
    _copy_bpe(cache_dir)  # before vbench's ViCLIP tokenizer module reads its default path
    _vbench(cache_dir)  # also makes torchvision importable for clip
    out = {
        "clip": build_clip(cache_dir),
        "aesthetic": build_aesthetic(cache_dir),
        "dino": build_dino(cache_dir, torch_home),
        "amt": build_amt(cache_dir),
        "raft": build_raft(cache_dir),
        "musiq": build_musiq(cache_dir),
        "viclip": build_viclip(cache_dir, scale),
        "umt": build_umt(cache_dir, scale),
    }
    if hf_cache and importlib.util.find_spec("fairscale") and importlib.util.find_spec(
            "transformers"):
        out["bert"] = build_hf_bert(hf_cache, cache_dir, scale)
        out["tag2text"] = build_tag2text(cache_dir, scale)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="build VBench stand-in weights (random parameters)")
    ap.add_argument("out_dir")
    ap.add_argument("--full", action="store_true",
                    help="ViCLIP and UMT at the ViT-L size VBench builds (else tiny: only for an "
                         "in-process run under tiny_fixed_architectures())")
    args = ap.parse_args(argv)
    cache = os.path.join(args.out_dir, "vbench_cache")
    home, hf = os.path.join(args.out_dir, "torch_home"), os.path.join(args.out_dir, "hf_hub")
    os.environ["TORCH_HOME"] = home
    files = build_standins(cache, home, "full" if args.full else "tiny", hf_cache=hf)
    for group, paths in files.items():
        for p in paths:
            print(f"{group}: {p}")
    print(f"--weights-dir {cache}\nexport TORCH_HOME={home} HUGGINGFACE_HUB_CACHE={hf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
