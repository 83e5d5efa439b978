"""``opensora-duca COMMAND [ARGS ...]``: one entry point for every command-line tool.

``pip install .`` installs it as the console script ``opensora-duca``; ``python -m
opensora_duca`` is the same. ``opensora-duca COMMAND ARGS`` runs what ``python
tools/<command>.py ARGS`` runs (``opensora_duca.cli.<command>.main``, with ``-`` in the command
name as ``_`` in the module's), so every command takes the options its tool documents.
``opensora-duca demo`` without a config file (no argument, or options only) runs the demo config
that ships inside the package (``opensora_duca/assets/demo_inference.py``, next to the demo
checkpoint it names: a byte-for-byte copy of ``configs/demo/inference.py``, whose checkpoint path
``{{ fileDirname }}/../../opensora_duca/assets/...`` resolves from either place), so it works
from any directory after a non-editable install.
Under torchrun: ``torchrun --nproc_per_node 2 -m opensora_duca demo``.

Every command (and every ``tools/<name>.py``, which runs through :func:`run_tool` too) also
takes ``--log-level LEVEL`` (DEBUG, INFO, WARNING, ERROR, CRITICAL): the library's messages
(Python ``logging``, loggers ``opensora_duca.*``, e.g. the cache reports of
``opensora_duca.cache`` at INFO) go to stderr from that level on. Without it logging is left
as Python sets it up (warnings and errors only).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from typing import Optional, Sequence

T_START = time.perf_counter()  # inference's reported wall time counts from here (as the tool's)

PROG = "opensora-duca"

#: {command: (module of opensora_duca.cli, one-line description)}, in the order --help lists them
COMMANDS = {
    "inference": ("inference", "generate videos from a config (plain or under torchrun)"),
    "demo": ("demo", "the demo model uncached, with DuCa and FORA+forecast; speed, judge, "
                     "PSNR/SSIM\n(CONFIG defaults to the packaged demo config)"),
    "benchmark": ("benchmark", "wall time, speedup, FLOPs ratio, memory, fidelity per policy"),
    "frontier": ("frontier", "quality-speed sweep of every policy's knob on the demo model"),
    "calibrate": ("calibrate", "fit TeaCache's rescaling polynomial on a model"),
    "judge": ("judge", "the demo judge (colour, shape, motion) on videos or the caption set"),
    "fidelity": ("fidelity", "PSNR / SSIM (LPIPS) of two folders of videos matched by name"),
    "analyze-error": ("analyze_error", "per-step error of each policy against the uncached run"),
    "train": ("train", "train a model (the demo model: configs/demo/train.py)"),
    "vbench-generate": ("vbench_generate", "the VBench prompt suite's videos (resumable, "
                                           "sharded over ranks)"),
    "vbench-evaluate": ("vbench_evaluate", "score a folder of videos with VBench"),
}


#: {name: path inside the package} of the configs that ship with it (package data)
PACKAGED_CONFIGS = {"demo": "assets/demo_inference.py"}


def packaged_config(name: str) -> str:
    """The installed path of packaged config ``name`` (one of :data:`PACKAGED_CONFIGS`)."""
    if name not in PACKAGED_CONFIGS:
        raise ValueError(f"packaged config {name!r} does not exist; accepted: one of "
                         f"{sorted(PACKAGED_CONFIGS)}")
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(package, *PACKAGED_CONFIGS[name].split("/"))


def usage(prog: str = PROG) -> str:
    """The top-level help text: the commands and what each does."""
    width = max(len(c) for c in COMMANDS) + 2
    lines = [f"usage: {prog} [-h] [--version] COMMAND [ARGS ...]", "",
             "Training-free feature caching (DuCa and 8 other policies) for Open-Sora video "
             "DiTs.", "", "commands:"]
    for name, (_, desc) in COMMANDS.items():
        first, *more = desc.split("\n")
        lines += [f"  {name:<{width}}{first}"] + [" " * (width + 2) + m for m in more]
    lines += ["", "every command also takes:", LOG_LEVEL_HELP]
    lines += ["", f"`{prog} COMMAND --help` shows a command's options;",
              "`python tools/<command>.py` (with _ for -) runs the same code."]
    return "\n".join(lines)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_LEVEL_HELP = ("  --log-level LEVEL  the library's log messages (loggers opensora_duca.*) to "
                  "stderr\n                     from LEVEL on: " + ", ".join(LOG_LEVELS)
                  + "\n                     (default: warnings and errors)")


def pop_log_level(argv: Sequence[str]) -> tuple:
    """``(level or None, argv without it)`` for ``--log-level LEVEL`` / ``--log-level=LEVEL``
    anywhere in ``argv`` (the last one wins); a missing or unknown level is a ValueError."""
    level, rest, it = None, [], iter(argv)
    for arg in it:
        if arg == "--log-level" or arg.startswith("--log-level="):
            value = arg.partition("=")[2] if "=" in arg else next(it, None)
            if value is None or value.upper() not in LOG_LEVELS:
                got = "needs a level" if value is None else f"{value!r} is not accepted"
                raise ValueError(f"--log-level {got}; accepted: one of {', '.join(LOG_LEVELS)}")
            level = value.upper()
        else:
            rest.append(arg)
    return level, rest


def run_tool(module: str, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None,
             **kwargs) -> int:
    """Run ``opensora_duca.cli.<module>.main(argv, **kwargs)`` after taking ``--log-level`` out
    of ``argv`` (default ``sys.argv[1:]``) and setting up logging with it; the exit status (the
    tool's int, 0 for a tool whose ``main`` returns its summary). ``tools/<module>.py`` and
    every ``opensora-duca`` command run through here."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0])
    try:
        level, argv = pop_log_level(argv)
    except ValueError as err:
        return _error(prog, str(err))
    if level is not None:
        logging.basicConfig(level=getattr(logging, level),
                            format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger().setLevel(getattr(logging, level))
    tool = importlib.import_module(f"{__package__}.{module}")
    try:
        rc = tool.main(argv, **kwargs)
    except SystemExit as done:  # the tool's --help: add the option it does not list itself
        if done.code in (0, None) and ("-h" in argv or "--help" in argv):
            print(LOG_LEVEL_HELP, flush=True)
        raise
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


def _error(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return 2


def _demo_args(argv: list) -> list:
    """``demo`` without a config file (no argument, or an option first): the packaged one."""
    try:
        probe = pop_log_level(argv)[1]
    except ValueError:  # run_tool reports it
        return argv
    if probe and (not probe[0].startswith("-") or probe[0] in ("-h", "--help")):
        return argv
    return [packaged_config("demo"), *argv]


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    """Run ``COMMAND ARGS``; the command's exit status (its ``main``'s int, 0 for a tool whose
    ``main`` returns its summary). Exit 2 with one line on stderr for a missing or unknown
    command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    accepted = ", ".join(COMMANDS)
    if not argv:
        return _error(prog, f"no command given; accepted: one of {accepted} "
                            f"(`{prog} --help` describes them)")
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help"):
        print(usage(prog))
        return 0
    if name == "--version":
        from .. import __version__
        print(f"{prog} {__version__}")
        return 0
    if name not in COMMANDS:
        return _error(prog, f"unknown command {name!r}; accepted: one of {accepted}")
    if name == "demo":
        rest = _demo_args(rest)
    saved, sys.argv[0] = sys.argv[0], f"{prog} {name}"  # argparse's prog: "opensora-duca demo"
    try:
        extra = dict(t_start=T_START) if name == "inference" else {}
        return run_tool(COMMANDS[name][0], rest, prog=f"{prog} {name}", **extra)
    finally:
        sys.argv[0] = saved


def console_main() -> None:
    """The ``opensora-duca`` console script."""
    sys.exit(main())


__all__ = ["COMMANDS", "LOG_LEVELS", "PACKAGED_CONFIGS", "PROG", "packaged_config", "main",
           "pop_log_level", "run_tool", "usage", "console_main"]
