"""Score a folder of generated videos with the VBench package, offline.

``python tools/vbench_evaluate.py --help`` shows the usage; the code is
:mod:`opensora_duca.cli.vbench_evaluate`.
"""
import sys

from opensora_duca.cli.vbench_evaluate import main

if __name__ == "__main__":
    sys.exit(main())
