"""Text encoders: DemoTextEncoder (tokens, embedding, null, weights) and t5 (errors, API)."""
import sys
import types

import pytest
import torch

from opensora_duca.data.synthetic import VOCABULARY, caption_set
from opensora_duca.models.text_encoders import DemoTextEncoder, T5Encoder
from opensora_duca.registry import TEXT_ENCODERS, build_module, registered


def test_registered():
    assert {"t5", "DemoTextEncoder"} <= set(registered(TEXT_ENCODERS))


def test_demo_encode_shapes_mask_and_determinism():
    te = build_module(dict(type="DemoTextEncoder"), TEXT_ENCODERS)
    out = te.encode(["a red circle moving left", "A blue square, staying still."])
    assert out["y"].shape == (2, 1, 12, 64) and out["mask"].shape == (2, 12)
    assert out["mask"].tolist()[0] == [1] * 5 + [0] * 7
    assert torch.all(out["y"][:, :, 5:] == 0)
    assert not out["y"].requires_grad
    prompts = caption_set()
    ids, _ = te.tokenize(prompts)
    assert len({tuple(r) for r in ids.tolist()}) == len(prompts)


def test_demo_unknown_word_error_lists_vocabulary():
    te = DemoTextEncoder()
    with pytest.raises(ValueError, match=r"\['purple'\].*accepted words.*'red'"):
        te.encode(["a purple circle moving left"])
    with pytest.raises(ValueError, match="model_max_length"):
        DemoTextEncoder(model_max_length=3).encode(["a red circle moving left"])
    with pytest.raises(ValueError, match=r"output_dim=0.*accepted"):
        DemoTextEncoder(output_dim=0)


def test_demo_null_needs_y_embedder():
    te = DemoTextEncoder()
    with pytest.raises(RuntimeError, match="y_embedder"):
        te.null(2)
    te.y_embedder = types.SimpleNamespace(y_embedding=torch.randn(12, 64))
    n = te.null(3)
    assert n.shape == (3, 1, 12, 64) and torch.equal(n[2, 0], te.y_embedder.y_embedding)
    assert "y_embedder" not in dict(te.named_modules())


def test_demo_from_pretrained_prefixed_bundle_and_plain(tmp_path):
    from safetensors.torch import save_file
    a = DemoTextEncoder()
    bundle = {f"text_encoder.{k}": v for k, v in a.state_dict().items()}
    bundle["model.x"] = torch.zeros(1)
    save_file(bundle, str(tmp_path / "b.safetensors"))
    save_file(a.state_dict(), str(tmp_path / "p.safetensors"))
    for name in ("b", "p"):
        torch.manual_seed(123)
        b = build_module(dict(type="DemoTextEncoder",
                              from_pretrained=str(tmp_path / f"{name}.safetensors")),
                         TEXT_ENCODERS)
        p = ["a red circle moving left"]
        assert torch.equal(a.encode(p)["y"], b.encode(p)["y"])
    with pytest.raises(FileNotFoundError, match="nope"):
        DemoTextEncoder(from_pretrained=str(tmp_path / "nope.safetensors"))


def test_t5_missing_path_and_missing_transformers(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="downloaded first"):
        build_module(dict(type="t5", from_pretrained="/no/such/t5"), TEXT_ENCODERS)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="transformers.*installed"):
        T5Encoder(from_pretrained=str(tmp_path))


def test_t5_encode_with_fake_transformers(tmp_path, monkeypatch):
    calls = {}

    class Tok:
        def __call__(self, texts, max_length, padding, truncation, **kw):
            calls["tok"] = dict(max_length=max_length, padding=padding, **kw)
            ids = torch.zeros(len(texts), max_length, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, t in enumerate(texts):
                mask[i, : len(t.split()) + 1] = 1
            return dict(input_ids=ids, attention_mask=mask)

    class Enc(torch.nn.Module):
        config = types.SimpleNamespace(d_model=8)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids, attention_mask):
            b, n = input_ids.shape
            return dict(last_hidden_state=torch.ones(b, n, 8) * self.w)

    fake = types.ModuleType("transformers")
    fake.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda p, **kw: Tok())
    fake.T5EncoderModel = types.SimpleNamespace(from_pretrained=lambda p, **kw: Enc())
    monkeypatch.setitem(sys.modules, "transformers", fake)
    te = build_module(dict(type="t5", from_pretrained=str(tmp_path)), TEXT_ENCODERS)
    assert te.model_max_length == 300 and te.output_dim == 8
    out = te.encode(["a cat", "a red dog runs"])
    assert out["y"].shape == (2, 1, 300, 8) and out["mask"].shape == (2, 300)
    assert out["mask"].sum(1).tolist() == [3, 5]
    assert calls["tok"]["padding"] == "max_length" and calls["tok"]["add_special_tokens"]
    te.y_embedder = types.SimpleNamespace(y_embedding=torch.zeros(300, 8))
    assert te.null(2).shape == (2, 1, 300, 8)
    assert VOCABULARY  # imported for the demo encoder's default vocabulary
