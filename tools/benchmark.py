"""Speed / cost / fidelity of cache policies on the same model, noise and captions.

``python tools/benchmark.py --help`` shows the usage; the code is
:mod:`opensora_duca.cli.benchmark`.
"""
import sys

from opensora_duca.cli.main import run_tool

if __name__ == "__main__":  # run_tool: opensora_duca.cli.benchmark.main, with --log-level
    sys.exit(run_tool("benchmark"))
