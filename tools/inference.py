"""Text-to-video inference with Open-Sora-1.2-style configs (optionally with feature caching).

``python tools/inference.py --help`` shows the usage; the code is
:mod:`opensora_duca.cli.inference`.
"""
import time

T_START = time.perf_counter()  # the reported wall time counts from here (imports included)

import sys  # noqa: E402

from opensora_duca.cli.inference import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(t_start=T_START))
