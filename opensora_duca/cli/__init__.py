"""The command-line tools; ``tools/<name>.py`` runs ``opensora_duca.cli.<name>.main``."""
