"""Train an STDiT3 with rectified flow (the demo model). ``python tools/train.py --help`` shows the
usage; the code is :mod:`opensora_duca.cli.train`.
"""
from opensora_duca.cli.train import main

if __name__ == "__main__":
    main()
