"""Generate the VBench prompt suite's videos, resumable, on one or many ranks.

``python tools/vbench_generate.py --help`` shows the usage; the code is
:mod:`opensora_duca.cli.vbench_generate`.
"""
import sys

from opensora_duca.cli.main import run_tool

if __name__ == "__main__":  # run_tool: opensora_duca.cli.vbench_generate.main, with --log-level
    sys.exit(run_tool("vbench_generate"))
