"""Loading the mmengine config files the tools take, and reading their values as plain data."""
from __future__ import annotations

import os
from typing import Any, Optional

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


def plain(value: Any) -> Any:
    """An mmengine Config / ConfigDict (anything with ``to_dict``) as plain nested dicts and
    lists; any other value unchanged."""
    return value.to_dict() if hasattr(value, "to_dict") else value


__all__ = ["load_config", "plain"]
