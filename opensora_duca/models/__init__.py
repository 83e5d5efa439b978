"""Models: STDiT3 and Open-Sora 2.0's MMDiT (registered sizes), attention backends, layers,
checkpoint loading, text encoders and latent codecs (registered into TEXT_ENCODERS / VAES)."""
from . import codecs, mmdit, stdit3, text_encoders  # noqa: F401  (registration side effects)
from .mmdit import MMDiTConfig, MMDiTModel  # noqa: F401
from .stdit3 import STDiT3, STDiT3Block  # noqa: F401
