"""The DuCa paper's error study: per-step, accumulated and claim-test errors of cache policies.

``python tools/analyze_error.py --help`` shows the usage; the code is
:mod:`opensora_duca.cli.analyze_error`.
"""
import sys

from opensora_duca.cli.main import run_tool

if __name__ == "__main__":  # run_tool: opensora_duca.cli.analyze_error.main, with --log-level
    sys.exit(run_tool("analyze_error"))
