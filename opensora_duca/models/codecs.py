"""Latent codecs (the "vae" entry of a config), registered in ``opensora_duca.registry.VAES``.

Every codec is an ``nn.Module`` (so ``.to(device, dtype)`` works as usual) with

- ``out_channels``: latent channels C;
- ``get_latent_size((T, H, W)) -> (t, h, w)``;
- ``encode(x)``: video [B, 3, T, H, W] in [-1, 1] -> latent [B, C, t, h, w];
- ``decode(z, num_frames=None)``: latent -> video [B, 3, T, H, W]; ``num_frames`` crops the
  decoded frames (needed where the latent frame count does not determine T). Outputs are NOT
  clamped: callers clamp to [-1, 1] when they convert to pixels.
- ``dtype`` / ``device``: where the codec computes (parameter-free codecs keep a zero-size
  buffer so that ``.to()`` moves them like any module).

Registered: ``identity`` (latent = pixels), ``DemoCodec`` (exact weight-free space-to-depth,
the demo model's codec), ``OpenSoraVAE_V1_2`` and ``OpenSoraVAE_V1_3`` (adapters to upstream
Open-Sora's VAEs; they need the ``opensora`` package of that release).
Open-Sora 2.0: ``tiny_causal_vae`` (weight-free, its latent layout: 16 channels, causal 4x
temporal and 8x spatial compression), ``hunyuan_vae`` and ``dc_ae`` (upstream 2.0's
autoencoders through its registry; they need the ``opensora`` package of Open-Sora 2.0).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..registry import VAES


class LatentCodec(nn.Module):
    """Base class: a parameter-free codec that tracks ``dtype``/``device`` via a tiny buffer."""

    out_channels: int = 3

    def __init__(self):
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def get_latent_size(self, input_size: Sequence[int | None]) -> list[int | None]:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _check_video(self, x: torch.Tensor, channels: int, what: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}.{what}: input shape {shape} is not "
                             f"accepted; accepted: a tensor [B, {channels}, T, H, W]")


def _check_int(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} is not accepted; accepted: an int >= {minimum}")
    return value


@VAES.register_module("identity")
class IdentityCodec(LatentCodec):
    """Latent = pixels (``in_channels`` channels, default 3); encode/decode only cast dtype."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.in_channels = self.out_channels = _check_int("in_channels", in_channels)

    def get_latent_size(self, input_size):
        return list(input_size)

    def encode(self, x):
        self._check_video(x, self.in_channels, "encode")
        return x.to(self.dtype)

    def decode(self, z, num_frames=None):
        self._check_video(z, self.out_channels, "decode")
        return z[:, :, :num_frames] if num_frames is not None else z


@VAES.register_module("DemoCodec")
class DemoCodec(LatentCodec):
    """Exact, weight-free space-to-depth codec of the demo model.

    ``encode``: [B, 3, T, H, W] -> [B, 3*k*f*f, T/k, H/f, W/f] with spatial ``factor`` f = 2
    and ``temporal_factor`` k (default 1), so [3, 8, 32, 32] -> [12, 8, 16, 16] (k = 1) or
    [24, 4, 16, 16] (k = 2). Latent channel ``((c*k + s)*f + i)*f + j`` of latent frame ``u``
    holds pixel channel ``c`` of frame ``u*k + s`` at offset (row i, column j) inside each
    f x f cell. Packing k frames per latent frame is what Open-Sora's VAE does too (17 frames
    -> 5); it puts the motion between the packed frames inside each token, where it can be
    learned like a colour (STDiT3 has no absolute temporal position, only RoPE).

    The latent is ``(pixels - shift) * scale`` with the documented defaults ``shift = 0.0`` and
    ``scale = 1.0``: the demo checkpoint is trained on these raw [-1, 1] latents (mean ~ -0.93,
    std ~ 0.35 on SyntheticShapes clips). They are deliberately not standardised: a larger
    scale makes the shapes visible through even more noise, moving the timesteps where a clip's
    layout and motion are decided further towards pure noise, and a 0.25 scale trained motion
    more slowly in a measured pilot. ``decode(encode(x)) == x`` up to float rounding (exactly,
    with the defaults). H and W must be multiples of ``factor``, T of ``temporal_factor``.
    """

    def __init__(self, factor: int = 2, in_channels: int = 3, scale: float = 1.0,
                 shift: float = 0.0, temporal_factor: int = 1):
        super().__init__()
        self.factor = _check_int("factor", factor)
        self.temporal_factor = _check_int("temporal_factor", temporal_factor)
        self.in_channels = _check_int("in_channels", in_channels)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale == 0:
            raise ValueError(f"scale={scale!r} is not accepted; accepted: a non-zero number")
        if not isinstance(shift, (int, float)) or isinstance(shift, bool):
            raise ValueError(f"shift={shift!r} is not accepted; accepted: a number")
        self.scale, self.shift = float(scale), float(shift)
        self.out_channels = self.in_channels * self.temporal_factor * self.factor ** 2

    def get_latent_size(self, input_size):
        t, h, w = input_size
        f, k = self.factor, self.temporal_factor
        for key, v, m, name in (("T", t, k, "temporal_factor"), ("H", h, f, "factor"),
                                ("W", w, f, "factor")):
            if v is not None and v % m:
                raise ValueError(f"DemoCodec: {key}={v} is not accepted; accepted: a multiple "
                                 f"of {name}={m}")
        return [None if t is None else t // k, None if h is None else h // f,
                None if w is None else w // f]

    def encode(self, x):
        self._check_video(x, self.in_channels, "encode")
        b, c, t, h, w = x.shape
        self.get_latent_size((t, h, w))
        f, k = self.factor, self.temporal_factor
        x = x.to(self.dtype).reshape(b, c, t // k, k, h // f, f, w // f, f)
        z = x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * k * f * f, t // k, h // f, w // f)
        if self.shift != 0.0:
            z = z - self.shift
        return z * self.scale if self.scale != 1.0 else z

    def decode(self, z, num_frames=None):
        self._check_video(z, self.out_channels, "decode")
        if self.scale != 1.0:
            z = z / self.scale
        if self.shift != 0.0:
            z = z + self.shift
        b, _, t, h, w = z.shape
        f, k, c = self.factor, self.temporal_factor, self.in_channels
        x = z.reshape(b, c, k, f, f, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, c, t * k, h * f, w * f)
        return x[:, :, :num_frames] if num_frames is not None else x


@VAES.register_module("OpenSoraVAE_V1_2")
class OpenSoraVAEAdapter(LatentCodec):
    """Upstream Open-Sora 1.2's VAE behind this interface.

    Builds ``dict(type="OpenSoraVAE_V1_2", **kwargs)`` through upstream's own registry
    (``opensora.registry.MODELS``), so every upstream keyword (``from_pretrained``,
    ``micro_frame_size``, ``micro_batch_size``, ...) is passed through unchanged. Raises
    ImportError when the ``opensora`` package is not importable.
    """

    upstream_type, release = "OpenSoraVAE_V1_2", "v1.2.0"

    def __init__(self, **kwargs: Any):
        super().__init__()
        try:
            from opensora.registry import MODELS as OPENSORA_MODELS  # type: ignore
        except ImportError as err:
            raise ImportError(
                f"vae type {self.upstream_type!r} needs upstream Open-Sora: the 'opensora' "
                f"package must be installed (pip install the hpcaitech/Open-Sora "
                f"{self.release} repository) to build it; import failed with: {err}. For the "
                "demo model use vae=dict(type='DemoCodec').") from err
        cfg = dict(type=self.upstream_type, **kwargs)
        self.module = OPENSORA_MODELS.build(cfg)
        self.out_channels = int(self.module.out_channels)

    @property
    def dtype(self):
        return getattr(self.module, "dtype", None) or next(self.module.parameters()).dtype

    @property
    def device(self):
        return getattr(self.module, "device", None) or next(self.module.parameters()).device

    def get_latent_size(self, input_size):
        return list(self.module.get_latent_size(list(input_size)))

    def encode(self, x):
        return self.module.encode(x)

    def decode(self, z, num_frames=None):
        return self.module.decode(z, num_frames=num_frames)


@VAES.register_module("OpenSoraVAE_V1_3")
class OpenSoraVAEV13Adapter(OpenSoraVAEAdapter):
    """Upstream Open-Sora 1.3's VAE (``OpenSoraVAE_V1_3``, 16 latent channels, 4x temporal
    compression) behind this interface, built through upstream's registry like the 1.2 one.
    Its ``decode`` ignores ``num_frames`` (the latent frame count sets the decoded length);
    this adapter crops to ``num_frames`` afterwards."""

    upstream_type, release = "OpenSoraVAE_V1_3", "v1.3"

    def decode(self, z, num_frames=None):
        x = self.module.decode(z)
        return x[:, :, :num_frames] if num_frames is not None else x


# ------------------------------------------------------------------------ Open-Sora 2.0
def _dct_basis(n: int = 8) -> torch.Tensor:
    """[n, n] float64 orthonormal DCT-II basis: row u = alpha(u) cos(pi (2x + 1) u / 2n)."""
    x = torch.arange(n, dtype=torch.float64)
    u = torch.arange(n, dtype=torch.float64)[:, None]
    basis = torch.cos(torch.pi * (2 * x + 1) * u / (2 * n))
    basis[0] *= (1 / n) ** 0.5
    basis[1:] *= (2 / n) ** 0.5
    return basis


@VAES.register_module("tiny_causal_vae")
class TinyCausalCodec(LatentCodec):
    """A weight-free causal codec with Open-Sora 2.0's latent layout (tests, CPU demos): 16
    latent channels, 4x temporal compression (causal: ``(T - 1) // 4 + 1`` latent frames) and
    8x spatial compression, as the HunyuanVideo VAE.

    Latent frame 0 is pixel frame 0, latent frame ``j >= 1`` the mean of pixel frames
    ``4j - 3 .. 4j`` (frames past ``1 + 4 (t - 1)`` are not encoded). Each 8 x 8 cell of a
    latent frame, in the orthonormal colour basis ``(1, 1, 1) / sqrt(3)``, ``(1, -1, 0) /
    sqrt(2)``, ``(1, 1, -2) / sqrt(6)``, gives 16 orthonormal 2-D DCT coefficients: 8 of the
    first colour (frequencies (0,0), (0,1), (1,0), (1,1), (0,2), (2,0), (1,2), (2,1)) and 4 of
    each other ((0,0), (0,1), (1,0), (1,1)), times ``scale`` (default 1/8: the first channel is
    sqrt(3) times the cell's mean). ``decode`` maps the coefficients back (the projection's
    transpose, so ``encode(decode(z)) == z`` up to rounding) and repeats latent frame
    ``j >= 1`` over 4 pixel frames: ``1 + 4 (t - 1)`` frames, cropped to ``num_frames``. H and
    W must be multiples of 8.
    """

    out_channels = 16
    temporal_compression, spatial_compression, is_causal = 4, 8, True
    compression = (4, 8, 8)
    LUMA = ((0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (1, 2), (2, 1))
    CHROMA = ((0, 0), (0, 1), (1, 0), (1, 1))

    def __init__(self, scale: float = 0.125):
        super().__init__()
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale == 0:
            raise ValueError(f"scale={scale!r} is not accepted; accepted: a non-zero number")
        self.scale = float(scale)
        colour = torch.tensor([[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=torch.float64)
        colour = colour / colour.norm(dim=1, keepdim=True)
        dct = _dct_basis(8)
        rows = []
        for c, freqs in ((0, self.LUMA), (1, self.CHROMA), (2, self.CHROMA)):
            for u, v in freqs:  # [3, 8, 8] pattern, flattened in (channel, row, column) order
                rows.append((colour[c][:, None, None] * dct[u][:, None] * dct[v][None, :])
                            .reshape(-1))
        self.register_buffer("projection", torch.stack(rows).float(), persistent=False)

    def get_latent_size(self, input_size):
        t, h, w = input_size
        return [None if t is None else (t - 1) // 4 + 1,
                None if h is None else (h - 1) // 8 + 1, None if w is None else (w - 1) // 8 + 1]

    def encode(self, x):
        self._check_video(x, 3, "encode")
        b, _, t, h, w = x.shape
        if h % 8 or w % 8:
            raise ValueError(f"TinyCausalCodec: H x W = {h} x {w} is not accepted; accepted: "
                             f"multiples of 8")
        lt = (t - 1) // 4 + 1
        x = x.to(self.dtype)
        frames = [x[:, :, :1]]
        if lt > 1:
            rest = x[:, :, 1:1 + 4 * (lt - 1)].reshape(b, 3, lt - 1, 4, h, w).mean(dim=3)
            frames.append(rest)
        x = torch.cat(frames, dim=2)  # [B, 3, lt, H, W]
        cells = x.reshape(b, 3, lt, h // 8, 8, w // 8, 8).permute(0, 2, 3, 5, 1, 4, 6)
        z = cells.reshape(b, lt, h // 8, w // 8, 192) @ self.projection.t()
        return z.permute(0, 4, 1, 2, 3) * self.scale

    def decode(self, z, num_frames=None):
        self._check_video(z, 16, "decode")
        b, _, lt, h, w = z.shape
        cells = (z / self.scale).permute(0, 2, 3, 4, 1) @ self.projection  # [B, lt, h, w, 192]
        x = cells.reshape(b, lt, h, w, 3, 8, 8).permute(0, 4, 1, 2, 5, 3, 6)
        x = x.reshape(b, 3, lt, h * 8, w * 8)
        x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
        return x[:, :, :num_frames] if num_frames is not None else x


class _UpstreamV2Codec(LatentCodec):
    """An Open-Sora 2.0 autoencoder built through upstream's own registry (``opensora`` 2.0
    importable), behind this interface. Every keyword goes to upstream's builder unchanged;
    ``device_map`` defaults to ``"cpu"`` and ``torch_dtype`` to float32 (the pipeline moves
    the codec to the run's device and dtype afterwards)."""

    upstream_type = ""

    def __init__(self, **kwargs: Any):
        super().__init__()
        try:
            import opensora.models  # type: ignore  # noqa: F401  (registers the types)
            from opensora.registry import MODELS as OPENSORA_MODELS  # type: ignore
        except ImportError as err:
            raise ImportError(
                f"ae type {self.upstream_type!r} needs upstream Open-Sora 2.0: the 'opensora' "
                f"package of hpcaitech/Open-Sora (main) must be installed to build it; import "
                f"failed with: {err}. For CPU tests use ae=dict(type='tiny_causal_vae')."
            ) from err
        if self.upstream_type not in OPENSORA_MODELS.module_dict:
            raise ImportError(
                f"ae type {self.upstream_type!r} is not registered by the installed 'opensora' "
                f"package (an Open-Sora 1.x release?); accepted: upstream Open-Sora 2.0")
        kwargs.setdefault("device_map", "cpu")
        kwargs.setdefault("torch_dtype", torch.float32)
        self.module = OPENSORA_MODELS.build(dict(type=self.upstream_type, **kwargs))
        self.temporal_compression = int(self.module.time_compression_ratio)
        self.spatial_compression = int(self.module.spatial_compression_ratio)
        self.compression = (self.temporal_compression, self.spatial_compression,
                            self.spatial_compression)
        self.is_causal = True  # both upstream 2.0 autoencoders: (T - 1) // r + 1 frames

    @property
    def dtype(self):
        return next(self.module.parameters()).dtype

    @property
    def device(self):
        return next(self.module.parameters()).device

    def get_latent_size(self, input_size):
        return list(self.module.get_latent_size(list(input_size)))

    def encode(self, x):
        return self.module.encode(x)

    def decode(self, z, num_frames=None):
        x = self.module.decode(z)
        return x[:, :, :num_frames] if num_frames is not None else x


@VAES.register_module("hunyuan_vae")
class HunyuanVAEAdapter(_UpstreamV2Codec):
    """Upstream Open-Sora 2.0's ``hunyuan_vae`` (16 channels, 4x temporal, 8x spatial)."""

    upstream_type = "hunyuan_vae"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.out_channels = int(self.module.z_channels)


@VAES.register_module("dc_ae")
class DCAEAdapter(_UpstreamV2Codec):
    """Upstream Open-Sora 2.0's ``dc_ae`` (Video DC-AE, e.g. ``dc-ae-f32t4c128``: 128
    channels, 4x temporal, 32x spatial)."""

    upstream_type = "dc_ae"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.out_channels = int(self.module.cfg.latent_channels)
