"""The quality-speed frontier of the cache policies. ``python tools/frontier.py --help`` shows
the usage; the code is :mod:`opensora_duca.cli.frontier`.
"""
import sys

from opensora_duca.cli.frontier import main

if __name__ == "__main__":
    sys.exit(main())
