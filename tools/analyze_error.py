"""The DuCa paper's error study: per-step, accumulated and claim-test errors of cache policies.

``python tools/analyze_error.py --help`` shows the usage; the code is
:mod:`opensora_duca.cli.analyze_error`.
"""
import sys

from opensora_duca.cli.analyze_error import main

if __name__ == "__main__":
    sys.exit(main())
