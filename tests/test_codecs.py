"""Latent codecs: registry, exact DemoCodec round trip, identity, Open-Sora adapter."""
import sys
import types

import pytest
import torch

from opensora_duca.models import codecs
from opensora_duca.registry import VAES, build_module, registered


def test_registered():
    assert {"identity", "DemoCodec", "OpenSoraVAE_V1_2"} <= set(registered(VAES))


def test_demo_codec_shapes_and_exact_roundtrip():
    c = build_module(dict(type="DemoCodec"), VAES)
    assert c.out_channels == 12 and list(c.get_latent_size((8, 32, 32))) == [8, 16, 16]
    x = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    z = c.encode(x)
    assert z.shape == (2, 12, 8, 16, 16)
    assert torch.equal(c.decode(z), x)
    assert torch.equal(c.decode(z, num_frames=5), x[:, :, :5])
    # channel layout documented: latent channel c*4 + i*2 + j holds pixel (c, 2h+i, 2w+j)
    assert torch.equal(z[:, 1 * 4 + 1 * 2 + 0], x[:, 1, :, 1::2, 0::2])


def test_demo_codec_temporal_factor():
    c = build_module(dict(type="DemoCodec", temporal_factor=2), VAES)
    assert c.out_channels == 24 and list(c.get_latent_size((8, 32, 32))) == [4, 16, 16]
    x = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    z = c.encode(x)
    assert z.shape == (2, 24, 4, 16, 16) and torch.equal(c.decode(z), x)
    # channel ((c*k + s)*f + i)*f + j of latent frame u holds pixel (c, frame u*k+s, 2h+i, 2w+j)
    assert torch.equal(z[:, ((1 * 2 + 1) * 2 + 0) * 2 + 1, 2], x[:, 1, 5, 0::2, 1::2])
    with pytest.raises(ValueError, match=r"T=7.*multiple of temporal_factor=2"):
        c.get_latent_size((7, 32, 32))


def test_demo_codec_scale_shift_roundtrip_and_dtype_device():
    c = codecs.DemoCodec(scale=2.5, shift=-0.5)
    x = torch.rand(1, 3, 4, 8, 8) * 2 - 1
    assert torch.allclose(c.decode(c.encode(x)), x, atol=1e-6)
    assert c.dtype == torch.float32 and c.device.type == "cpu"
    c = c.to(torch.float64)
    assert c.dtype == torch.float64 and c.encode(x).dtype == torch.float64
    assert len(list(c.parameters())) == 0


def test_identity_codec():
    c = build_module(dict(type="identity", in_channels=4), VAES)
    x = torch.randn(1, 4, 3, 5, 5)
    assert torch.equal(c.decode(c.encode(x)), x) and c.out_channels == 4
    assert list(c.get_latent_size((3, 5, 5))) == [3, 5, 5]


def test_bad_input_errors_name_value_and_accepted():
    c = codecs.DemoCodec()
    with pytest.raises(ValueError, match=r"\(1, 4, 8, 32, 32\).*accepted"):
        c.encode(torch.zeros(1, 4, 8, 32, 32))
    with pytest.raises(ValueError, match=r"W=31.*multiple of factor=2"):
        c.get_latent_size((8, 32, 31))
    with pytest.raises(ValueError, match=r"factor=0.*accepted"):
        codecs.DemoCodec(factor=0)
    with pytest.raises(ValueError, match=r"scale=0.*accepted"):
        codecs.DemoCodec(scale=0)


def test_opensora_adapter_without_opensora(monkeypatch):
    monkeypatch.setitem(sys.modules, "opensora", None)  # import fails
    with pytest.raises(ImportError, match="Open-Sora|opensora.*must be installed"):
        build_module(dict(type="OpenSoraVAE_V1_2", from_pretrained="x"), VAES)


def test_opensora_adapter_builds_through_upstream_registry(monkeypatch):
    built = {}

    class FakeVAE(torch.nn.Module):
        out_channels = 4

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def get_latent_size(self, s):
            return [s[0] // 17 * 5, s[1] // 8, s[2] // 8]

        def encode(self, x):
            return torch.zeros(x.shape[0], 4, 5, x.shape[3] // 8, x.shape[4] // 8)

        def decode(self, z, num_frames=None):
            return torch.zeros(z.shape[0], 3, num_frames, z.shape[3] * 8, z.shape[4] * 8)

    class FakeRegistry:
        def build(self, cfg):
            built.update(cfg)
            return FakeVAE()

    pkg, reg = types.ModuleType("opensora"), types.ModuleType("opensora.registry")
    reg.MODELS = FakeRegistry()
    monkeypatch.setitem(sys.modules, "opensora", pkg)
    monkeypatch.setitem(sys.modules, "opensora.registry", reg)
    vae = build_module(dict(type="OpenSoraVAE_V1_2", from_pretrained="hpcai-tech/vae",
                            micro_frame_size=17), VAES)
    assert built == dict(type="OpenSoraVAE_V1_2", from_pretrained="hpcai-tech/vae",
                         micro_frame_size=17)
    assert vae.out_channels == 4 and list(vae.get_latent_size((17, 64, 64))) == [5, 8, 8]
    z = vae.encode(torch.zeros(1, 3, 17, 64, 64))
    assert z.shape == (1, 4, 5, 8, 8)
    assert vae.decode(z, num_frames=17).shape == (1, 3, 17, 64, 64)
    assert vae.dtype == torch.float32


def test_opensora_v13_adapter(monkeypatch):
    """The 1.3 VAE is built through upstream's registry under its own type name; its decode
    takes no frame count, so the adapter crops the decoded frames."""
    built, seen = {}, {}

    class FakeVAE13(torch.nn.Module):
        out_channels = 16

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def get_latent_size(self, s):
            return [(s[0] - 1) // 4 + 1, s[1] // 8, s[2] // 8]

        def encode(self, x):
            return torch.zeros(x.shape[0], 16, (x.shape[2] - 1) // 4 + 1, x.shape[3] // 8,
                               x.shape[4] // 8)

        def decode(self, z, is_training=False, **kwargs):
            seen.update(kwargs)
            return torch.arange(z.shape[2] * 4, dtype=torch.float32).view(1, 1, -1, 1, 1).expand(
                z.shape[0], 3, -1, z.shape[3] * 8, z.shape[4] * 8)

    class FakeRegistry:
        def build(self, cfg):
            built.update(cfg)
            return FakeVAE13()

    pkg, reg = types.ModuleType("opensora"), types.ModuleType("opensora.registry")
    reg.MODELS = FakeRegistry()
    monkeypatch.setitem(sys.modules, "opensora", pkg)
    monkeypatch.setitem(sys.modules, "opensora.registry", reg)
    vae = build_module(dict(type="OpenSoraVAE_V1_3", from_pretrained="vae13", z_channels=16,
                            micro_frame_size=17, temporal_overlap=True), VAES)
    assert built == dict(type="OpenSoraVAE_V1_3", from_pretrained="vae13", z_channels=16,
                         micro_frame_size=17, temporal_overlap=True)
    assert vae.out_channels == 16 and list(vae.get_latent_size((113, 64, 64))) == [29, 8, 8]
    z = vae.encode(torch.zeros(1, 3, 113, 64, 64))
    x = vae.decode(z, num_frames=113)
    assert x.shape == (1, 3, 113, 64, 64) and seen == {}
    assert x[0, 0, :, 0, 0].tolist() == list(range(113))  # the first frames are kept
    assert vae.decode(z).shape[2] == 116
    monkeypatch.setitem(sys.modules, "opensora", None)
    monkeypatch.setitem(sys.modules, "opensora.registry", None)
    with pytest.raises(ImportError, match="OpenSoraVAE_V1_3.*v1.3"):
        build_module(dict(type="OpenSoraVAE_V1_3"), VAES)
