"""munge, which SLURM authenticates with: reuse a munged that works, or start one as user munge.

The package makes `/etc/munge/munge.key` (else `mungekey --create`); munged must run as user
`munge` with its runtime folder `/run/munge` owned by munge; `munge -n | unmunge` checks it
(docs/slurm.md, "the notes"). A munged that already works is reused and left running; one we
start is remembered by its pid in a mark file, so that it, and only it, is stopped again.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from . import procs
from .shell import SlurmError, run, say, tail, wait_until, which

MUNGE_RUN_DIR = Path("/run/munge")
MUNGE_PID_FILE = MUNGE_RUN_DIR / "munged.pid"
MUNGE_LOG = Path("/var/log/munge/munged.log")
MUNGE_KEY = Path("/etc/munge/munge.key")


def munge_works() -> bool:
    if which("munge") is None or which("unmunge") is None:
        return False
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def start_munge(mark: Path, stderr_path: Path) -> None:
    """Reuse a munged that works; otherwise start one as user munge and write its pid to `mark`."""
    if munge_works():
        return
    MUNGE_RUN_DIR.mkdir(mode=0o755, exist_ok=True)
    shutil.chown(MUNGE_RUN_DIR, "munge", "munge")
    if not MUNGE_KEY.exists():  # the package normally creates it
        run(["mungekey", "--create"], user="munge", group="munge")
    with open(stderr_path, "wb") as err:
        proc = subprocess.run(
            [which("munged")],
            user="munge",
            group="munge",
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            timeout=30,
        )
    if proc.returncode != 0 or not wait_until(munge_works, 10):
        raise SlurmError(
            f"munged did not start or `munge -n | unmunge` fails (exit {proc.returncode})\n"
            f"--- {stderr_path}\n{tail(stderr_path)}\n"
            f"--- {MUNGE_LOG}\n{tail(MUNGE_LOG)}"
        )
    try:
        mark.write_text(MUNGE_PID_FILE.read_text())
    except OSError as e:
        say(f"munged runs but {MUNGE_PID_FILE} is unreadable ({e.strerror}): stop() will leave it running")


def our_munged(mark: Path) -> int | None:
    """The pid of the munged that start_munge started (recorded in `mark`), if it still runs."""
    try:
        pid = int(mark.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if procs.alive(pid) and procs.comm(pid) == "munged" else None
