"""Exit codes of train/main.py, shared with the launchers (no torch here: the launcher imports it)."""

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "checkpointed on a signal, run me again"
