"""Text-to-video inference with Open-Sora-1.2-style configs (optionally with feature caching).

``python tools/inference.py --help`` shows the usage; the code is
:mod:`opensora_duca.cli.inference`.
"""
import time

T_START = time.perf_counter()  # the reported wall time counts from here (imports included)

import sys  # noqa: E402

from opensora_duca.cli.main import run_tool  # noqa: E402

if __name__ == "__main__":  # run_tool: opensora_duca.cli.inference.main, with --log-level
    sys.exit(run_tool("inference", t_start=T_START))
