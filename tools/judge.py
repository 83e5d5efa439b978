"""Judge demo videos against their captions. ``python tools/judge.py --help`` shows the usage;
the code is :mod:`opensora_duca.cli.judge`.
"""
import sys

from opensora_duca.cli.main import run_tool

if __name__ == "__main__":  # run_tool: opensora_duca.cli.judge.main, with --log-level
    sys.exit(run_tool("judge"))
