"""``python -m opensora_duca COMMAND [ARGS ...]``: the ``opensora-duca`` command
(:mod:`opensora_duca.cli.main`); ``python -m opensora_duca --help`` lists the commands."""
import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m opensora_duca"))
