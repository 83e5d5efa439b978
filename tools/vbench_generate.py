"""Generate the VBench prompt suite's videos, resumable, on one or many ranks.

``python tools/vbench_generate.py --help`` shows the usage; the code is
:mod:`opensora_duca.cli.vbench_generate`.
"""
import sys

from opensora_duca.cli.vbench_generate import main

if __name__ == "__main__":
    sys.exit(main())
