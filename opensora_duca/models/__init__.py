"""Models: STDiT3 (registered sizes), attention backends, layers,
checkpoint loading, text encoders and latent codecs (registered into TEXT_ENCODERS / VAES)."""
from . import codecs, stdit3, text_encoders  # noqa: F401  (registration side effects)
from .stdit3 import STDiT3, STDiT3Block  # noqa: F401
