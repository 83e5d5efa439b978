"""Configs that ship inside the package, so an installed ``opensora-duca`` finds them from any
directory: ``demo_inference.py`` is a byte-for-byte copy of the repository's
``configs/demo/inference.py`` (``tests/test_cli_entry.py`` checks that the two are equal), and
its checkpoint path (``{{ fileDirname }}/../../opensora_duca/assets/...``) resolves to the
package's own ``assets/`` from here as from ``configs/demo/``."""
import os

#: {name: file name} of the packaged configs
PACKAGED = {"demo": "demo_inference.py"}


def packaged_config(name: str) -> str:
    """The path of packaged config ``name`` (one of :data:`PACKAGED`)."""
    if name not in PACKAGED:
        raise ValueError(f"packaged config {name!r} does not exist; accepted: {sorted(PACKAGED)}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), PACKAGED[name])


__all__ = ["PACKAGED", "packaged_config"]
