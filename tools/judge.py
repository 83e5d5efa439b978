"""Judge demo videos against their captions. ``python tools/judge.py --help`` shows the usage;
the code is :mod:`opensora_duca.cli.judge`.
"""
from opensora_duca.cli.judge import main

if __name__ == "__main__":
    main()
