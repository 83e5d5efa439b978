"""Fit TeaCache's rescaling polynomial on a config's model. ``python tools/calibrate.py --help``
shows the usage; the code is :mod:`opensora_duca.cli.calibrate`.
"""
import sys

from opensora_duca.cli.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
