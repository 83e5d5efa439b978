"""PSNR / SSIM (/ LPIPS) of the videos of one folder against those of another.

``python tools/fidelity.py --help`` shows the usage; the code is :mod:`opensora_duca.cli.fidelity`.
"""
import sys

from opensora_duca.cli.fidelity import main

if __name__ == "__main__":
    sys.exit(main())
