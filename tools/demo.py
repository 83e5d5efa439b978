"""The main job: the demo model uncached and with DuCa; speed, judge verdicts, fidelity.

``python tools/demo.py --help`` shows the usage; the code is :mod:`opensora_duca.cli.demo`.
"""
import sys

from opensora_duca.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
