"""Train an STDiT3 with rectified flow (the demo model). ``python tools/train.py --help`` shows the
usage; the code is :mod:`opensora_duca.cli.train`.
"""
import sys

from opensora_duca.cli.main import run_tool

if __name__ == "__main__":  # run_tool: opensora_duca.cli.train.main, with --log-level
    sys.exit(run_tool("train"))
