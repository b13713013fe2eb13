"""Running commands for the local SLURM cluster: its errors, the search path with /usr/sbin, a
command bounded in time, waiting for a condition, the tail of a log."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

# The daemons live in /usr/sbin, which a non-login root shell may not have on PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


class SlurmError(RuntimeError):
    """The local cluster or one of its jobs did not do what was expected."""


class SlurmUnavailable(SlurmError):
    """SLURM is not installed and cannot be installed here (not root, or no apt-get)."""


def which(command: str) -> str | None:
    return shutil.which(command, path=SEARCH_PATH)


def run(cmd: list[str], *, timeout: float = 30, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command to completion, bounded by `timeout`; errors say which command and why."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)
    except subprocess.TimeoutExpired as e:
        raise SlurmError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from e
    if check and proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise SlurmError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {detail}")
    return proc


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def tail(path: str | os.PathLike | None, lines: int = 20) -> str:
    """The last lines of a text file, or a note saying why there are none."""
    if not path:
        return "(no file)"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"({path}: {e.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def say(message: str) -> None:
    print(f"[local-slurm] {message}", file=sys.stderr, flush=True)
