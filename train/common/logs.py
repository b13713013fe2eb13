"""Log lines a person can follow in a SLURM output file, as LLaMA-Factory and torchtune print
them: a timestamp and a level on every line; rank 0 at the chosen level, every other rank only
its warnings and errors (with its rank named), so N ranks do not print everything N times.

The level comes from PESO_LOG_LEVEL (DEBUG, INFO, WARNING, ERROR; default INFO): an environment
variable reaches every rank that a launcher, torchrun, srun or sbatch starts, where a flag would
have to be passed on at each of them. Lines go to stdout, where the lines they replace went
(under SLURM, stdout and stderr are the same file anyway).
"""

from __future__ import annotations

import logging
import os
import sys

LEVEL_VARIABLE = "PESO_LOG_LEVEL"
PACKAGES = ("train", "launcher")  # the loggers configured here; other libraries keep their own
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def chosen_level() -> tuple[int, str | None]:
    """The level PESO_LOG_LEVEL names (INFO when unset), and a complaint when it names none."""
    name = os.environ.get(LEVEL_VARIABLE, "INFO").strip().upper() or "INFO"
    if name not in LEVELS:
        return (
            logging.INFO,
            f"{LEVEL_VARIABLE}={os.environ[LEVEL_VARIABLE]!r} is not one of {', '.join(LEVELS)}; using INFO",
        )
    return logging.getLevelName(name), None


def line_format(rank: int = 0) -> logging.Formatter:
    """`2026-12-02 14:03:11 INFO message`; other ranks' lines also say `[rank N]`."""
    where = f"[rank {rank}] " if rank else ""
    return logging.Formatter(f"%(asctime)s %(levelname)s {where}%(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def stamped(message: str) -> str:
    """`message` as an INFO line, for a file that no logger writes to."""
    return line_format().format(logging.makeLogRecord({"msg": message, "levelname": "INFO", "levelno": logging.INFO}))


def configure_logging(rank: int = 0) -> None:
    """Route the loggers of train/ and launcher/ to stdout for this process (`rank`). Calling it
    again replaces the set-up instead of doubling every line."""
    level, complaint = chosen_level()
    if rank != 0:
        level = max(level, logging.WARNING)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(line_format(rank))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False  # a root handler configured by a library would print each line twice
    if complaint:
        logging.getLogger("train").warning(complaint)
