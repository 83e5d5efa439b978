"""PSNR / SSIM (/ LPIPS) of the videos of one folder against those of another.

``python tools/fidelity.py --help`` shows the usage; the code is :mod:`opensora_duca.cli.fidelity`.
"""
import sys

from opensora_duca.cli.main import run_tool

if __name__ == "__main__":  # run_tool: opensora_duca.cli.fidelity.main, with --log-level
    sys.exit(run_tool("fidelity"))
