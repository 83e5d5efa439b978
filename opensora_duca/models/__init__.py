"""Models: STDiT3 (registered sizes), attention backends, layers, checkpoint loading."""
from . import stdit3  # noqa: F401  (registers the STDiT3 presets)
from .stdit3 import STDiT3, STDiT3Block  # noqa: F401

try:  # text encoders and latent codecs (registered into TEXT_ENCODERS / VAES)
    from . import codecs, text_encoders  # noqa: F401
except ImportError as _e:  # pragma: no cover - only while these modules are being written
    if "codecs" not in str(_e) and "text_encoders" not in str(_e):
        raise
