"""Layout adapters, one module per model family (see :mod:`.base` for what an adapter
answers); importing this package registers them."""
from .base import LAYOUTS, layout_for, register_layout, tapped_modules
from .mmdit import MMDiTLayout
from .stdit3 import STDiT3Layout

__all__ = ["LAYOUTS", "MMDiTLayout", "STDiT3Layout", "layout_for", "register_layout",
           "tapped_modules"]
