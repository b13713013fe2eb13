"""Processes, read from /proc: which belong to our cluster (and only those), and stopping them.

A process is ours if it is a slurmctld/slurmd started with `-f <our slurm.conf>`, or a
slurmstepd/slurmscriptd/job process whose environment has our SLURM_CONF (jobs: SLURM_JOB_ID
too). This process and its parents are never ours, whatever their environment says.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable

from .shell import wait_until

# Processes the daemons fork (slurmctld's script runner, slurmd's per-job step daemon): they
# inherit the daemons' environment, hence our SLURM_CONF.
SLURM_HELPERS = ("slurmstepd", "slurmscriptd")


def read_proc(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:  # gone, or a kernel thread
        return b""


def alive(pid: int) -> bool:
    """True for a running process; a zombie (dead, not yet reaped) counts as gone."""
    stat = read_proc(pid, "stat")
    if not stat:
        return False
    state = stat[stat.rfind(b")") + 2 :][:1]  # the field after "(comm)"
    return state not in (b"Z", b"X")


def comm(pid: int) -> str:
    return read_proc(pid, "comm").decode(errors="replace").strip()


def cmdline(pid: int) -> list[str]:
    return [a.decode(errors="replace") for a in read_proc(pid, "cmdline").split(b"\0") if a]


def environ(pid: int) -> dict[str, str]:
    env = {}
    for entry in read_proc(pid, "environ").split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            env[key] = value
    return env


def self_and_ancestors() -> set[int]:
    """This process and its parents: never to be killed, whatever their environment says."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        stat = read_proc(pid, "stat")
        pid = int(stat[stat.rfind(b")") + 2 :].split()[1]) if stat else 0
    return pids


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def terminate(pids: Iterable[int], grace: float = 10) -> list[int]:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the pids still alive after."""
    pids = [p for p in pids if alive(p)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        wait_until(lambda still=pids: not any(alive(p) for p in still), wait, 0.1)
        pids = [p for p in pids if alive(p)]
        if not pids:
            break
    return pids


def daemons_of(conf: str) -> dict[int, str]:
    """pid -> 'slurmctld' or the node name, for daemons running with the slurm.conf `conf`."""
    found = {}
    for pid in all_pids():
        name = comm(pid)
        if name in ("slurmctld", "slurmd") and alive(pid):
            args = cmdline(pid)
            if conf in args:  # we always start them with `-f <our conf>`
                found[pid] = args[args.index("-N") + 1] if "-N" in args[:-1] else name
    return found


def job_processes_of(conf: str) -> list[int]:
    """slurmstepd, slurmscriptd and job processes of the cluster whose SLURM_CONF is `conf`.

    slurmstepd outlives a killed slurmd, and job processes outlive a killed slurmstepd, so
    after a crash they are found by environment. A process must also be a SLURM helper or carry
    SLURM_JOB_ID: a developer's shell that exported our SLURM_CONF is not a job.
    """
    protected, found = self_and_ancestors(), []
    for pid in all_pids():
        if pid in protected or not alive(pid):
            continue
        env = environ(pid)
        if env.get("SLURM_CONF") == conf and (comm(pid) in SLURM_HELPERS or "SLURM_JOB_ID" in env):
            found.append(pid)
    return found
