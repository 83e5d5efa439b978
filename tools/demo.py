"""The main job: the demo model uncached and with DuCa; speed, judge verdicts, fidelity.

``python tools/demo.py --help`` shows the usage; the code is :mod:`opensora_duca.cli.demo`.
"""
import sys

from opensora_duca.cli.main import run_tool

if __name__ == "__main__":  # run_tool: opensora_duca.cli.demo.main, with --log-level
    sys.exit(run_tool("demo"))
