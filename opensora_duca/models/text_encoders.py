"""Text encoders (the "text_encoder" entry of a config), registered in ``TEXT_ENCODERS``.

Both follow Open-Sora's interface:

- ``encode(prompts: list[str]) -> dict(y=[n, 1, L, C], mask=[n, L])`` (mask: long, 1 = valid
  token, padded to ``model_max_length`` = L);
- ``null(n) -> [n, 1, L, C]``: the model's learned null caption. The pipeline sets
  ``text_encoder.y_embedder = model.y_embedder`` (as Open-Sora's scripts do), and ``null``
  repeats ``y_embedder.y_embedding`` ([L, C]);
- ``output_dim`` (C) and ``model_max_length`` (L).

Registered: ``t5`` (a T5 encoder loaded with ``transformers`` from a local folder) and
``DemoTextEncoder`` (a tiny word-level encoder trained together with the demo model).

Open-Sora 2.0's pair (its ``t5`` and ``clip`` config entries; called as
``embedder(prompts) -> [B, L, C]`` or pooled ``[B, C]``, without masks or a null caption:
``text_embedder`` (T5 or CLIP from a local folder, as upstream's ``HFEmbedder``) and
``hashed_text_embedder`` (a deterministic weight-free stand-in for tests and CPU demos).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..registry import TEXT_ENCODERS
from ..utils.dtype import resolve_dtype


def _check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts={prompts!r} is not accepted; accepted: a list of strings")
    return list(prompts)


class _NullMixin:
    """``null(n)`` from the model's ``y_embedder`` (set by the pipeline)."""

    y_embedder: Any = None

    def null(self, n: int) -> torch.Tensor:
        if self.y_embedder is None or not hasattr(self.y_embedder, "y_embedding"):
            raise RuntimeError(
                f"{type(self).__name__}.null needs the model's caption embedder: set "
                "text_encoder.y_embedder = model.y_embedder first (the pipeline does this)")
        emb = self.y_embedder.y_embedding
        return emb[None, None].repeat(int(n), 1, 1, 1)


@TEXT_ENCODERS.register_module("t5")
class T5Encoder(_NullMixin):
    """T5 encoder + tokenizer loaded with ``transformers`` from a LOCAL folder.

    Args:
        from_pretrained: folder holding the tokenizer and the encoder weights (e.g. a download
            of ``DeepFloyd/t5-v1_1-xxl``); nothing is downloaded here.
        model_max_length: L (default 300, Open-Sora 1.2's value).
        dtype: compute dtype ("fp32", "fp16", "bf16" or a torch.dtype; default fp32).
        device: where the encoder runs (default "cpu").
        local_files_only: passed to ``from_pretrained`` (default True).
        shardformer: accepted because Open-Sora configs set it; colossalai's shardformer is not
            used here (the encoder runs unsharded).
    """

    def __init__(self, from_pretrained: str | None = None, model_max_length: int = 300,
                 dtype: Any = torch.float32, device: Any = "cpu", local_files_only: bool = True,
                 shardformer: bool = False):
        if not isinstance(from_pretrained, (str, os.PathLike)) or not os.path.isdir(
                from_pretrained):
            raise FileNotFoundError(
                f"text_encoder t5: from_pretrained={from_pretrained!r} is not an existing "
                "folder; accepted: a local folder with a T5 encoder and its tokenizer (e.g. "
                "DeepFloyd/t5-v1_1-xxl). It must be downloaded first; nothing is downloaded here")
        try:
            from transformers import AutoTokenizer, T5EncoderModel  # type: ignore
        except ImportError as err:
            raise ImportError(
                "text_encoder t5 needs the 'transformers' package (and 'sentencepiece' for the "
                f"T5 tokenizer): it must be installed first (pip install transformers "
                f"sentencepiece); import failed with: {err}") from err
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or \
                model_max_length < 1:
            raise ValueError(f"model_max_length={model_max_length!r} is not accepted; "
                             "accepted: an int >= 1")
        self.model_max_length = model_max_length
        self.dtype = resolve_dtype(dtype)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(from_pretrained,
                                                       local_files_only=local_files_only)
        self.model = T5EncoderModel.from_pretrained(
            from_pretrained, torch_dtype=self.dtype, local_files_only=local_files_only)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.output_dim = int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        prompts = _check_prompts(prompts)
        tok = self.tokenizer(prompts, max_length=self.model_max_length, padding="max_length",
                             truncation=True, return_attention_mask=True,
                             add_special_tokens=True, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        y = self.model(input_ids=ids, attention_mask=mask)["last_hidden_state"].detach()
        return dict(y=y[:, None], mask=mask)

    def to(self, *args, **kwargs):
        self.model = self.model.to(*args, **kwargs)
        self.device = next(self.model.parameters()).device
        return self


@TEXT_ENCODERS.register_module("DemoTextEncoder")
class DemoTextEncoder(_NullMixin, nn.Module):
    """Word-level caption encoder of the demo model, trained together with it.

    Tokens: captions are lower-cased, punctuation is dropped, and each word is looked up in
    ``vocabulary`` (default: the SyntheticShapes vocabulary; token id = 1 + word index, 0 is
    padding). An unknown word raises ValueError naming the word and listing the vocabulary (no
    UNK token: the demo model only knows these words). Captions longer than
    ``model_max_length`` raise too.

    Embedding: ``y[i, 0, k] = tok_emb[id_k] + pos_emb[k]`` followed by a residual
    GELU-MLP (``y + mlp(LayerNorm(y))``); padded positions are zero and masked out.

    Weights: ``from_pretrained`` is a safetensors file. Keys prefixed ``text_encoder.`` are
    used when present (the shipped demo checkpoint is ONE file holding the model's keys as
    ``model.*`` and this encoder's as ``text_encoder.*``, as ``tools/train.py`` exports it);
    otherwise the file is read as this module's own state dict.
    """

    def __init__(self, output_dim: int = 64, model_max_length: int = 12,
                 vocabulary: Sequence[str] | None = None, hidden_dim: int | None = None,
                 from_pretrained: str | None = None, device: Any = None):
        super().__init__()
        if vocabulary is None:
            from ..data.synthetic import VOCABULARY as vocabulary
        vocabulary = list(vocabulary)
        if not vocabulary or not all(isinstance(w, str) and w for w in vocabulary) or \
                len(set(vocabulary)) != len(vocabulary):
            raise ValueError(f"vocabulary={vocabulary!r} is not accepted; accepted: a list of "
                             "distinct non-empty words")
        for key, value in dict(output_dim=output_dim, model_max_length=model_max_length).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} is not accepted; accepted: an int >= 1")
        self.vocabulary = tuple(vocabulary)
        self.word_to_id = {w: i + 1 for i, w in enumerate(self.vocabulary)}
        self.output_dim, self.model_max_length = output_dim, model_max_length
        hidden = hidden_dim or 2 * output_dim
        self.tok_emb = nn.Embedding(len(self.vocabulary) + 1, output_dim, padding_idx=0)
        self.pos_emb = nn.Parameter(torch.zeros(model_max_length, output_dim))
        self.norm = nn.LayerNorm(output_dim)
        self.mlp = nn.Sequential(nn.Linear(output_dim, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, output_dim))
        nn.init.normal_(self.tok_emb.weight, std=1.0)
        with torch.no_grad():
            self.tok_emb.weight[0].zero_()
        nn.init.normal_(self.pos_emb, std=0.1)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        if from_pretrained is not None:
            self.load_file(from_pretrained)
        if device is not None:  # the pipeline passes the run's device, as to the t5 encoder
            self.to(device)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "y_embedder":  # a reference to the model's module, not a child of ours
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def load_file(self, path: str) -> None:
        if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
            raise FileNotFoundError(f"text_encoder DemoTextEncoder: from_pretrained={path!r} "
                                    "is not an existing file; accepted: a .safetensors file")
        from safetensors.torch import load_file
        sd = load_file(str(path))
        prefixed = {k[len("text_encoder."):]: v for k, v in sd.items()
                    if k.startswith("text_encoder.")}
        sd = prefixed or sd
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        if missing:
            raise KeyError(f"{path}: DemoTextEncoder weights missing {missing}")
        self.load_state_dict({k: sd[k] for k in own})

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (ids [n, L] long, mask [n, L] long)."""
        from ..data.synthetic import normalize_caption
        prompts = _check_prompts(prompts)
        ids = torch.zeros(len(prompts), self.model_max_length, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = normalize_caption(p).split()
            unknown = [w for w in words if w not in self.word_to_id]
            if unknown:
                raise ValueError(f"prompt {p!r}: words {unknown} are not in the demo text "
                                 f"encoder's vocabulary; accepted words: {list(self.vocabulary)}")
            if not words or len(words) > self.model_max_length:
                raise ValueError(f"prompt {p!r} has {len(words)} words; accepted: 1.."
                                 f"{self.model_max_length} (model_max_length)")
            ids[i, :len(words)] = torch.tensor([self.word_to_id[w] for w in words])
        return ids, (ids > 0).long()

    @property
    def device(self) -> torch.device:
        return self.pos_emb.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_emb.dtype

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Differentiable embedding of token ids -> y [n, 1, L, C]."""
        y = self.tok_emb(ids) + self.pos_emb[: ids.shape[1]]
        y = y + self.mlp(self.norm(y))
        return (y * mask[..., None].to(y.dtype))[:, None]

    def forward(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return dict(y=self.embed(ids, mask), mask=mask)

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Like Open-Sora's: no gradients (training calls the module itself)."""
        with torch.no_grad():
            return self(prompts)


# ------------------------------------------------------------- Open-Sora 2.0 text pair
def _check_length(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} is not accepted; accepted: an int >= 1")
    return value


def _align(n: int, added_tokens: int, seq_align: int) -> int:
    """Text length padded so that ``added_tokens + length`` is a multiple of ``seq_align``."""
    rest = (added_tokens + n) % seq_align
    return n if rest == 0 else n + seq_align - rest


@TEXT_ENCODERS.register_module("text_embedder")
class HFTextEmbedder(nn.Module):
    """Open-Sora 2.0's text embedder (its ``t5`` / ``clip`` config entries): a T5 encoder
    (``last_hidden_state`` [B, max_length, 4096] for T5-XXL) or a CLIP text model
    (``pooler_output`` [B, 768]), loaded with ``transformers`` from a LOCAL folder.

    As upstream: a folder whose path contains ``openai`` is CLIP, any other T5 (``kind="t5"``
    or ``"clip"`` decides explicitly); prompts are padded to ``max_length`` (512 for T5, 77 for
    CLIP upstream) and truncated, and the encoder runs without an attention mask.
    ``__call__(prompts, added_tokens=0, seq_align=1)`` pads the token ids with the pad token
    until ``added_tokens + length`` is a multiple of ``seq_align``. ``shardformer`` is accepted
    (upstream's configs set it) and not used. Nothing is downloaded.
    """

    def __init__(self, from_pretrained: Optional[str] = None, max_length: int = 512,
                 shardformer: bool = False, kind: Optional[str] = None,
                 dtype: Any = torch.float32, device: Any = "cpu", local_files_only: bool = True):
        super().__init__()
        if not isinstance(from_pretrained, (str, os.PathLike)) or not os.path.isdir(
                from_pretrained):
            raise FileNotFoundError(
                f"text_embedder: from_pretrained={from_pretrained!r} is not an existing folder; "
                "accepted: a local folder with a T5 (google/t5-v1_1-xxl) or CLIP "
                "(openai/clip-vit-large-patch14) text model and its tokenizer, downloaded "
                "first; nothing is downloaded here")
        if kind not in (None, "t5", "clip"):
            raise ValueError(f"text_embedder kind={kind!r} is not accepted; accepted: None (from "
                             "the path, as upstream: 'openai' in it means CLIP), 't5' or 'clip'")
        self.max_length = _check_length("text_embedder max_length", max_length)
        try:
            import transformers  # type: ignore
        except ImportError as err:
            raise ImportError(
                "text_embedder needs the 'transformers' package (and 'sentencepiece' for T5): "
                f"it must be installed first (pip install transformers sentencepiece); import "
                f"failed with: {err}") from err
        self.is_clip = kind == "clip" if kind is not None else "openai" in str(from_pretrained)
        self.output_key = "pooler_output" if self.is_clip else "last_hidden_state"
        dtype = resolve_dtype(dtype)
        if self.is_clip:
            self.tokenizer = transformers.CLIPTokenizer.from_pretrained(
                from_pretrained, max_length=max_length, local_files_only=local_files_only)
            module = transformers.CLIPTextModel.from_pretrained(
                from_pretrained, torch_dtype=dtype, local_files_only=local_files_only)
        else:
            self.tokenizer = transformers.T5Tokenizer.from_pretrained(
                from_pretrained, max_length=max_length, legacy=True,
                local_files_only=local_files_only)
            module = transformers.T5EncoderModel.from_pretrained(
                from_pretrained, torch_dtype=dtype, local_files_only=local_files_only)
        self.hf_module = module.to(device).eval().requires_grad_(False)
        cfg = self.hf_module.config
        self.output_dim = int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.hf_module.parameters()).device

    @torch.no_grad()
    def forward(self, prompts: Sequence[str], added_tokens: int = 0,
                seq_align: int = 1) -> torch.Tensor:
        prompts = _check_prompts(prompts)
        tok = self.tokenizer(prompts, truncation=True, max_length=self.max_length,
                             padding="max_length", return_tensors="pt")
        ids = tok["input_ids"]
        n = _align(ids.shape[1], added_tokens, seq_align)
        if n > ids.shape[1]:
            ids = nn.functional.pad(ids, (0, n - ids.shape[1]),
                                    value=self.tokenizer.pad_token_id)
        out = self.hf_module(input_ids=ids.to(self.device), attention_mask=None,
                             output_hidden_states=False)
        return out[self.output_key]


@TEXT_ENCODERS.register_module("hashed_text_embedder")
class HashedTextEmbedder(nn.Module):
    """A tiny deterministic stand-in for Open-Sora 2.0's T5 / CLIP pair (tests, CPU demos).

    Words are the lower-cased runs of letters and digits of a prompt. Each word ``w`` (and the
    padding token) has a fixed vector: ``dim`` standard normal draws from a CPU generator
    seeded with the first 8 bytes of ``sha256(f"{seed}:{w}")``, so any word is accepted and the
    vectors depend on nothing else (not on the global RNG, the device or the batch).

    ``pooled=False`` (the T5 role): [B, max_length, dim], position ``k`` holding the ``k``-th
    word's vector (the padding vector past the prompt's words; words past ``max_length``
    dropped) plus ``0.1 sin / cos`` position features. ``pooled=True`` (the CLIP role): [B, dim],
    the mean of the prompt's word vectors (the padding vector for an empty prompt).
    ``__call__(prompts, added_tokens=0, seq_align=1)`` as :class:`HFTextEmbedder`.
    """

    def __init__(self, dim: int = 32, max_length: int = 16, pooled: bool = False, seed: int = 0,
                 from_pretrained: Optional[str] = None, shardformer: bool = False,
                 device: Any = None, dtype: Any = None):
        super().__init__()
        self.output_dim = _check_length("hashed_text_embedder dim", dim)
        self.max_length = _check_length("hashed_text_embedder max_length", max_length)
        if not isinstance(pooled, bool):
            raise ValueError(f"hashed_text_embedder pooled={pooled!r} is not accepted; "
                             "accepted: True or False")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"hashed_text_embedder seed={seed!r} is not accepted; accepted: "
                             "an int")
        if from_pretrained is not None:
            raise ValueError("hashed_text_embedder has no weights; accepted: "
                             "from_pretrained=None")
        self.pooled, self.seed = pooled, seed
        self._vectors: dict[str, torch.Tensor] = {}
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        if device is not None:
            self.to(device)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @staticmethod
    def words(prompt: str) -> list[str]:
        import re
        return re.findall(r"[a-z0-9]+", prompt.lower())

    def vector(self, word: str) -> torch.Tensor:
        """The fixed float32 vector of ``word`` (``"<pad>"``: the padding token)."""
        if word not in self._vectors:
            import hashlib
            digest = hashlib.sha256(f"{self.seed}:{word}".encode("utf-8")).digest()
            gen = torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            self._vectors[word] = torch.randn(self.output_dim, generator=gen)
        return self._vectors[word]

    def positions(self, n: int) -> torch.Tensor:
        """[n, dim] float32 position features 0.1 sin / cos(k / 10000^(2j / dim))."""
        k = torch.arange(n, dtype=torch.float64)[:, None]
        j = torch.arange(self.output_dim, dtype=torch.float64)[None]
        angle = k / 10000 ** (2 * (j // 2) / self.output_dim)
        return (0.1 * torch.where(j % 2 == 0, angle.sin(), angle.cos())).float()

    @torch.no_grad()
    def forward(self, prompts: Sequence[str], added_tokens: int = 0,
                seq_align: int = 1) -> torch.Tensor:
        prompts = _check_prompts(prompts)
        pad = self.vector("<pad>")
        if self.pooled:
            out = [torch.stack([self.vector(w) for w in self.words(p)]).mean(0)
                   if self.words(p) else pad for p in prompts]
            return torch.stack(out).to(self.device)
        n = _align(self.max_length, added_tokens, seq_align)
        rows = []
        for p in prompts:
            words = self.words(p)[:self.max_length]
            vecs = [self.vector(w) for w in words] + [pad] * (n - len(words))
            rows.append(torch.stack(vecs) + self.positions(n))
        return torch.stack(rows).to(self.device)
