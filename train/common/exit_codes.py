"""Exit codes of train/main.py, shared with the launchers (no torch here: the launcher imports it)."""

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "checkpointed on a signal, run me again"
EXIT_USAGE = 2  # a usage, config or input error (a damaged file): one `error:` line says what and what to do


class Refused(Exception):
    """Every rank agreed to stop on a usage, config or input error whose one line is printed
    already (by one rank, train/dist/strategy.py `agree`): the process leaves with EXIT_USAGE,
    quietly."""
