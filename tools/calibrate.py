"""Fit TeaCache's rescaling polynomial on a config's model. ``python tools/calibrate.py --help``
shows the usage; the code is :mod:`opensora_duca.cli.calibrate`.
"""
import sys

from opensora_duca.cli.main import run_tool

if __name__ == "__main__":  # run_tool: opensora_duca.cli.calibrate.main, with --log-level
    sys.exit(run_tool("calibrate"))
