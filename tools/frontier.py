"""The quality-speed frontier of the cache policies. ``python tools/frontier.py --help`` shows
the usage; the code is :mod:`opensora_duca.cli.frontier`.
"""
import sys

from opensora_duca.cli.main import run_tool

if __name__ == "__main__":  # run_tool: opensora_duca.cli.frontier.main, with --log-level
    sys.exit(run_tool("frontier"))
