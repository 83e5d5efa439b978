"""Loading the mmengine config files the tools take."""
from __future__ import annotations

import os
from typing import Optional

from mmengine.config import Config


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """The mmengine Config of ``path`` with ``cfg_options`` (``{"a.b": value}``, as mmengine's
    ``DictAction`` parses ``--cfg-options a.b=value``) merged in."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config {path!r} does not exist; accepted: an mmengine config "
                                f"file")
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


__all__ = ["load_config"]
