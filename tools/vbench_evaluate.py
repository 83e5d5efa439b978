"""Score a folder of generated videos with the VBench package, offline.

``python tools/vbench_evaluate.py --help`` shows the usage; the code is
:mod:`opensora_duca.cli.vbench_evaluate`.
"""
import sys

from opensora_duca.cli.main import run_tool

if __name__ == "__main__":  # run_tool: opensora_duca.cli.vbench_evaluate.main, with --log-level
    sys.exit(run_tool("vbench_evaluate"))
