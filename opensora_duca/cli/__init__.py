"""The command-line tools; ``tools/<name>.py`` and ``opensora-duca <name>`` (``-`` for ``_``;
:mod:`opensora_duca.cli.main`) run ``opensora_duca.cli.<name>.main``."""
