"""Speed / cost / fidelity of cache policies on the same model, noise and captions.

``python tools/benchmark.py --help`` shows the usage; the code is
:mod:`opensora_duca.cli.benchmark`.
"""
import sys

from opensora_duca.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
