"""A real, throwaway SLURM cluster on this machine, so tests can run `sbatch slurm/continual.sh`.

What it is
----------
One `slurmctld` and two `slurmd` (nodes `node1` and `node2`, both on 127.0.0.1 with different
ports), authenticated by `munge`. Everything the daemons write (slurm.conf, state, one spool
folder per node, logs, pid files) lives in one base folder, by default `/tmp/peso-slurm`
(`PESO_SLURM_BASE` or `LocalSlurm(base=...)` changes it). The base folder is fixed rather than
random so that a later session finds, reuses or cleans up what an earlier one left behind. Jobs
run as root on this machine, so the job's working directory and files are shared between the
"nodes" by construction. It is the stock SLURM 22.05 of Debian 12, not a mock: sbatch, srun,
dependencies, signals and requeue behave as on a production cluster, only smaller.

The facts below were measured on this machine type; see docs/slurm.md, "The local test cluster"
("the notes").

Settings that are not obvious (slurm.conf, see `LocalSlurm.config_text`)
-------------------------------------------------------------------------
- `SlurmctldHost=<hostname -s>(127.0.0.1)`: the name must equal `hostname -s` or slurmctld
  refuses to run; the address keeps all traffic on the loopback (notes).
- `NodeName=node[1-2] NodeHostname=<host> NodeAddr=127.0.0.1 Port=[p1-p2]`: two slurmd on one
  host, told apart by port and started with `slurmd -N nodeX` (notes). Ports default to
  16817-16819, not SLURM's 6817-6819, so a system SLURM on the same machine does not collide.
- `SlurmdParameters=config_overrides`: a node may claim more CPUs than the machine has, so a
  2-node job can run 2 tasks per node on a 2-core machine (notes). `RealMemory` is set (machine
  memory split between the nodes) so that jobs that ask for `--mem` can be scheduled.
- `ProctrackType=proctrack/linuxproc`, `TaskPlugin=task/none`, no accounting, no cgroups: what
  works without systemd or cgroup delegation (notes).
- `MinJobAge=3600`: finished jobs stay visible to `scontrol show job` for an hour; there is no
  accounting database, so no `sacct` (notes used 600; a test session can be longer).
- `AuthInfo=cred_expire=10` and `SchedulerParameters=bf_interval=1,sched_interval=1`: a
  requeued job waits `cred_expire + 1` seconds before it may start again (default 120 s). With
  the notes' `bf_interval=1` alone the rerun started 11-30 s after the requeue: backfill skips
  its pass when no job or node changed, and a job that merely became eligible is no change, so
  the rerun waited for the main scheduler's periodic pass. `sched_interval=1` makes that pass
  run every second: requeue to rerun measured 10.6 s. (It also starts dependent jobs sooner.)
- Not configurable: slurmctld checks time limits, and so `--signal=...@N`, every 30 s (a fixed
  period in its background loop); USR1 arrives up to 30 s after it is due (measured 1-31 s
  with `--time=1 --signal=B:USR1@59`), and a job runs up to 30 s past its time limit.
- `ReturnToService=2`: a node that was down (e.g. slurmd restarted) comes back by itself (notes).
- `KillWait=3`: seconds between SIGTERM and SIGKILL when a job is cancelled or times out; small
  so tests and teardown are quick (default 30).
- `PlugStackConfig` points to an empty file of ours so no SPANK plugin configured system-wide is
  loaded; every command gets `SLURM_CONF` (see `env()`) so no other slurm.conf is read.
- `slurmctld -c` starts from a clean state (notes): no jobs from an earlier session come back.
- munge: the package makes `/etc/munge/munge.key` (else `mungekey --create`); munged must run as
  user `munge` with its runtime folder `/run/munge` owned by munge; `munge -n | unmunge` checks it
  (notes). A munged that already works is reused and left running; one we start is stopped again.
- slurmd logs PMIx and hwloc errors: harmless (notes).
- The daemons are started as orphans; this machine's PID 1 reaps dead ones only after a second
  or two, so `pgrep` may list `<defunct>` entries briefly; stop() waits up to 5 s for that.

Ownership: a process is ours if it is a slurmctld/slurmd started with `-f <our slurm.conf>`, or
a slurmstepd/slurmscriptd/job process whose environment has our SLURM_CONF (jobs: SLURM_JOB_ID
too); munged only if its pid is the one we recorded when we started it. start() first kills
what a crashed session left on the same base folder; nothing else is ever signalled.

API (see each docstring): `ensure_installed()`, `start() -> bool`, `stop()`, `is_up()`,
`status()`, `env()`, `command(args)` (any SLURM client command), `sbatch(args, env, cwd) -> id`,
`job_info(id) -> dict`, `wait_for(id, states, timeout, reason)`, `describe(id)`, `squeue()`,
`cancel_all()`; errors are `SlurmError` (`SlurmUnavailable`: cannot be installed here).

By hand (from the repository root)
----------------------------------
    python -m tests.slurm.cluster start    # installs if needed (root), stands up; idempotent
    eval "$(python -m tests.slurm.cluster env)"
    sbatch --wrap hostname; squeue; scontrol show job -o 1
    python -m tests.slurm.cluster status
    python -m tests.slurm.cluster stop     # daemons, jobs, our munged, the base folder

A cluster started by hand is marked as such: a test session that finds it up uses it and leaves
it running. One that a test session started (or found without that mark, e.g. left over by a
crashed session) is torn down at the end of the session.

From Python:
    cluster = LocalSlurm()
    cluster.ensure_installed(); cluster.start()
    job = cluster.sbatch(["--wrap", "true"]); cluster.wait_for(job)
    cluster.stop()
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from launcher.slurm import parse_scontrol_line
from train.launch_env import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
COMMANDS = ["slurmctld", "slurmd", "sbatch", "munged"]
# The daemons live in /usr/sbin, which a non-login root shell may not have on PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])

# States a job does not leave again (a requeued job goes back to PENDING, never through these).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
    }
)
# Environment prefixes that change what the SLURM commands do (SBATCH_PARTITION, SQUEUE_FORMAT,
# or a SLURM_JOB_ID when the tests themselves run inside a job on a real cluster).
SLURM_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCONTROL_")

# Processes the daemons fork (slurmctld's script runner, slurmd's per-job step daemon): they
# inherit the daemons' environment, hence our SLURM_CONF.
SLURM_HELPERS = ("slurmstepd", "slurmscriptd")

MUNGE_RUN_DIR = Path("/run/munge")
MUNGE_PID_FILE = MUNGE_RUN_DIR / "munged.pid"
MUNGE_LOG = Path("/var/log/munge/munged.log")
MUNGE_KEY = Path("/etc/munge/munge.key")


class SlurmError(RuntimeError):
    """The local cluster or one of its jobs did not do what was expected."""


class SlurmUnavailable(SlurmError):
    """SLURM is not installed and cannot be installed here (not root, or no apt-get)."""


# --------------------------------------------------------------------------------------------
# Small helpers


def _which(command: str) -> str | None:
    return shutil.which(command, path=SEARCH_PATH)


def _run(cmd: list[str], *, timeout: float = 30, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command to completion, bounded by `timeout`; errors say which command and why."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)
    except subprocess.TimeoutExpired as e:
        raise SlurmError(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from e
    if check and proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise SlurmError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {detail}")
    return proc


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
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


def _log(message: str) -> None:
    print(f"[local-slurm] {message}", file=sys.stderr, flush=True)


# Processes, read from /proc. Used to find what belongs to our cluster, and only that.


def _read_proc(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:  # gone, or a kernel thread
        return b""


def _alive(pid: int) -> bool:
    """True for a running process; a zombie (dead, not yet reaped) counts as gone."""
    stat = _read_proc(pid, "stat")
    if not stat:
        return False
    state = stat[stat.rfind(b")") + 2 :][:1]  # the field after "(comm)"
    return state not in (b"Z", b"X")


def _comm(pid: int) -> str:
    return _read_proc(pid, "comm").decode(errors="replace").strip()


def _cmdline(pid: int) -> list[str]:
    return [a.decode(errors="replace") for a in _read_proc(pid, "cmdline").split(b"\0") if a]


def _environ(pid: int) -> dict[str, str]:
    env = {}
    for entry in _read_proc(pid, "environ").split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            env[key] = value
    return env


def _self_and_ancestors() -> set[int]:
    """This process and its parents: never to be killed, whatever their environment says."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        stat = _read_proc(pid, "stat")
        pid = int(stat[stat.rfind(b")") + 2 :].split()[1]) if stat else 0
    return pids


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _terminate(pids: Iterable[int], grace: float = 10) -> list[int]:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the pids still alive after."""
    pids = [p for p in pids if _alive(p)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        _wait_until(lambda alive=pids: not any(_alive(p) for p in alive), wait, 0.1)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            break
    return pids


# --------------------------------------------------------------------------------------------
# The cluster


class LocalSlurm:
    """slurmctld + `nodes` slurmd (+ munge) on this machine, configured under `base`."""

    def __init__(
        self, base: str | os.PathLike | None = None, *, nodes: int = 2, cpus_per_node: int = 2, port: int | None = None
    ):
        self.base = Path(base or os.environ.get("PESO_SLURM_BASE") or "/tmp/peso-slurm").absolute()
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node
        # slurmctld listens on `port`, node i on `port + i`.
        self.port = int(port or os.environ.get("PESO_SLURM_PORT") or 16817)
        self.conf_path = self.base / "slurm.conf"
        self.log_dir = self.base / "log"
        self.ctld_log = self.log_dir / "slurmctld.log"
        self.hostname = socket.gethostname().split(".")[0]

    # -- configuration --------------------------------------------------------------------

    def slurmd_log(self, node: str) -> Path:
        return self.log_dir / f"slurmd-{node}.log"

    def config_text(self) -> str:
        b = self.base
        first, last = self.port + 1, self.port + len(self.nodes)
        node_range = f"node[1-{len(self.nodes)}]" if len(self.nodes) > 1 else "node1"
        port_range = f"[{first}-{last}]" if last > first else str(first)
        return "\n".join(
            [
                "# Generated by tests/slurm/cluster.py; each setting is explained in its docstring.",
                "ClusterName=peso-local",
                f"SlurmctldHost={self.hostname}(127.0.0.1)",
                f"SlurmctldPort={self.port}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                "AuthInfo=cred_expire=10",
                f"StateSaveLocation={b}/state",
                f"SlurmdSpoolDir={b}/spool/%n",
                f"SlurmctldPidFile={b}/run/slurmctld.pid",
                f"SlurmdPidFile={b}/run/slurmd-%n.pid",
                f"SlurmctldLogFile={self.ctld_log}",
                f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
                "SlurmctldDebug=info",
                "SlurmdDebug=info",
                f"PlugStackConfig={b}/plugstack.conf",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "MpiDefault=none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "SchedulerType=sched/backfill",
                "SchedulerParameters=bf_interval=1,sched_interval=1",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "SlurmdParameters=config_overrides",
                "ReturnToService=2",
                "MinJobAge=3600",
                "KillWait=3",
                "InactiveLimit=0",
                "MailProg=/bin/true",  # none installed; slurmctld logs an error without one
                f"NodeName={node_range} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port_range} "
                f"CPUs={self.cpus_per_node} RealMemory={self._memory_per_node_mb()} State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    def _memory_per_node_mb(self) -> int:
        with open("/proc/meminfo") as f:
            total_kb = int(f.readline().split()[1])  # first line: MemTotal
        return max(1, total_kb // 1024 // len(self.nodes))

    def env(self) -> dict[str, str]:
        """The environment for sbatch/srun/scontrol/squeue against this cluster.

        The caller's environment without variables that would steer SLURM commands elsewhere
        (SLURM_*, SBATCH_*, ...), plus SLURM_CONF pointing at our slurm.conf and /usr/sbin on PATH.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(SLURM_ENV_PREFIXES)}
        env["SLURM_CONF"] = str(self.conf_path)
        env["PATH"] = SEARCH_PATH
        return env

    def command(self, args: list[str], *, timeout: float = 15, check: bool = True, **kwargs):
        """Run a SLURM client command (sinfo, scontrol, ...) against this cluster.

        Refuses at once when our slurm.conf is missing: the commands would retry for 60 s.
        """
        if not self.conf_path.exists():
            raise SlurmError(f"the local cluster is not set up ({self.conf_path} is missing): start() it first")
        return _run(args, env=kwargs.pop("env", None) or self.env(), timeout=timeout, check=check, **kwargs)

    def _daemon_env(self) -> dict[str, str]:
        # Minimal on purpose: daemons (and the slurmstepd they fork) carry SLURM_CONF, which is
        # also how stop() recognises a slurmstepd of ours.
        return {"PATH": SEARCH_PATH, "SLURM_CONF": str(self.conf_path), "LANG": "C.UTF-8"}

    # -- installation -----------------------------------------------------------------------

    @staticmethod
    def missing_commands() -> list[str]:
        return [c for c in COMMANDS if _which(c) is None]

    def ensure_installed(self) -> None:
        """Install SLURM and munge from Debian packages if their commands are missing.

        Raises SlurmUnavailable if this is impossible here: not root (the cluster needs root in
        any case: slurmd runs jobs as root, munged is started as user munge), or no apt-get.
        """
        missing = self.missing_commands()
        how = f"apt-get install --no-install-recommends {' '.join(PACKAGES)}"
        if os.geteuid() != 0:
            also = f"; SLURM is not installed either (missing: {', '.join(missing)}): {how}" if missing else ""
            raise SlurmUnavailable(
                f"the local SLURM cluster needs root (it starts slurmd, which runs jobs, "
                f"and munged as user munge){also}"
            )
        if not missing:
            return
        if _which("apt-get") is None:
            raise SlurmUnavailable(
                f"SLURM is not installed (missing: {', '.join(missing)}) and there is no "
                f"apt-get; install SLURM (slurmctld, slurmd, client commands) and munge"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # Wait for another apt (e.g. unattended upgrades on a fresh CI machine) instead of failing.
        apt = ["apt-get", "-o", "DPkg::Lock::Timeout=120"]
        install = apt + ["install", "-y", "--no-install-recommends", *PACKAGES]
        updated = False
        if not self._apt_knows_packages():
            _log("apt-get update (no package lists for SLURM yet)")
            _run(apt + ["update"], timeout=300, env=env)
            updated = True
        _log(f"missing {', '.join(missing)}: {' '.join(install)}")
        try:
            _run(install, timeout=600, env=env)
        except SlurmError as e:
            if updated:
                raise
            # Old package lists on a machine image name versions the mirror no longer has.
            _log(f"{e}\n[local-slurm] apt-get update, then install again")
            _run(apt + ["update"], timeout=300, env=env)
            _run(install, timeout=600, env=env)
        missing = self.missing_commands()
        if missing:
            raise SlurmError(f"installed {' '.join(PACKAGES)} but still missing: {', '.join(missing)}")

    @staticmethod
    def _apt_knows_packages() -> bool:
        out = _run(["apt-cache", "policy", *PACKAGES], check=False).stdout
        candidates = re.findall(r"^\s+Candidate: (.+)$", out, flags=re.M)
        return len(candidates) == len(PACKAGES) and "(none)" not in candidates

    # -- state ------------------------------------------------------------------------------

    @property
    def started_by_hand(self) -> bool:
        """True if `python -m tests.slurm.cluster start` made it: test sessions leave it running."""
        return (self.base / "started-by-hand").exists()

    def is_up(self) -> bool:
        """Our config is in place, munge works, our daemons run and every node responds."""
        try:
            same_config = self.conf_path.read_text() == self.config_text()
        except OSError:
            return False
        daemons = self._our_daemons()
        return (
            same_config
            and self._munge_works()
            and sorted(daemons.values()) == sorted(["slurmctld"] + self.nodes)
            and self._nodes_in({"idle", "mixed", "allocated", "completing"})
        )

    def _node_states(self) -> dict[str, str]:
        """node -> state as sinfo reports it ('idle', 'down*', ...); empty if slurmctld does not answer."""
        if not self.conf_path.exists():
            return {}
        proc = self.command(["sinfo", "--noheader", "--Node", "--format=%N %T"], check=False)
        if proc.returncode != 0:
            return {}
        return dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.strip())

    def _nodes_in(self, states: set[str]) -> bool:
        found = self._node_states()
        return sorted(found) == sorted(self.nodes) and all(s in states for s in found.values())

    def _ctld_answers(self) -> bool:
        return self.conf_path.exists() and self.command(["scontrol", "ping"], check=False).returncode == 0

    def status(self) -> str:
        lines = [
            f"base:    {self.base}",
            f"config:  {self.conf_path}",
            f"up:      {self.is_up()}{' (started by hand)' if self.started_by_hand else ''}",
            f"munge:   {'works' if self._munge_works() else 'not working'}",
        ]
        daemons = self._our_daemons()
        lines += [f"daemon:  {name} pid {pid}" for pid, name in sorted(daemons.items())] or ["daemons: none"]
        lines += [f"node:    {node} {state}" for node, state in sorted(self._node_states().items())]
        return "\n".join(lines)

    def log_tails(self, lines: int = 15) -> str:
        logs = [self.ctld_log] + [self.slurmd_log(n) for n in self.nodes] + sorted(self.log_dir.glob("*.stderr"))
        return "\n".join(f"--- {p} (last lines)\n{tail(p, lines)}" for p in logs if p.exists())

    # -- start ------------------------------------------------------------------------------

    def start(self) -> bool:
        """Stand the cluster up; nothing to do if it is already up with the same config.

        Returns True if it started anything. On failure, stops what it started (keeping the
        logs in the base folder) and raises SlurmError with the daemons' log tails.
        """
        missing = self.missing_commands()
        if missing:
            raise SlurmError(f"missing {', '.join(missing)}: call ensure_installed() first")
        if self.is_up():
            return False
        _log(f"starting slurmctld + {len(self.nodes)} slurmd under {self.base}")
        t0 = time.monotonic()
        try:
            survivors = self._kill_leftovers()[1]  # an earlier, crashed session on this base folder
            if survivors:
                raise SlurmError(f"processes of an earlier cluster on {self.base} survived SIGKILL: {survivors}")
            self.base.mkdir(parents=True, exist_ok=True)
            self._start_munge()
            self._prepare_base()
            self._check_ports_free()
            self._start_slurmctld()
            self._start_slurmds()
        except BaseException:
            try:
                self.stop(remove=False)
            except SlurmError as e:  # keep the original error; this one only adds to it
                _log(f"cleaning up after the failed start: {e}")
            raise
        _log(f"up in {time.monotonic() - t0:.1f} s: nodes {', '.join(self.nodes)} idle")
        return True

    def _prepare_base(self) -> None:
        """A fresh config and empty state/spool/log/run folders (keeping the munge ownership mark)."""
        for sub in ("state", "spool", "log", "run"):
            shutil.rmtree(self.base / sub, ignore_errors=True)
            (self.base / sub).mkdir(parents=True)
        for node in self.nodes:  # slurmd does not create its spool folder
            (self.base / "spool" / node).mkdir()
        (self.base / "plugstack.conf").write_text("")
        (self.base / "started-by-hand").unlink(missing_ok=True)
        self.conf_path.write_text(self.config_text())

    def _check_ports_free(self) -> None:
        for port in range(self.port, self.port + len(self.nodes) + 1):
            try:
                free_port(port=port, reuse_address=True)  # bound as the daemons bind
            except OSError as e:
                raise SlurmError(
                    f"port {port} is taken by another program ({e.strerror}); choose other ports "
                    f"with PESO_SLURM_PORT (slurmctld's port; the nodes use the next ones)"
                ) from e

    def _spawn_daemon(self, name: str, args: list[str]) -> None:
        """Run a daemon that forks itself into the background; its early errors go to a file."""
        stderr_path = self.log_dir / f"{name}.stderr"
        with open(stderr_path, "wb") as err:
            # The parent exits once the daemon has forked; the daemon keeps only `err` open, so this
            # returns at once (pipes here would keep run() waiting for the daemon's end).
            proc = subprocess.run(
                [_which(args[0]), *args[1:]],
                env=self._daemon_env(),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                timeout=30,
                cwd=self.base,
            )
        if proc.returncode != 0:
            raise SlurmError(f"{name} did not start (exit {proc.returncode})\n{self.log_tails()}")

    def _wait_ready(self, what: str, ready: Callable[[], bool], daemons: list[str], timeout: float) -> None:
        """Wait until `ready()`; fail early, with the logs, if one of `daemons` has died.

        "Died" means not seen for a second: one look at /proc can miss a daemon that is forking
        itself into the background (the parent exits after the listing, the child is not in it).
        """
        last_seen = {name: time.monotonic() for name in daemons}

        def done() -> bool:
            now, running = time.monotonic(), set(self._our_daemons().values())
            last_seen.update({name: now for name in daemons if name in running})
            dead = sorted(name for name, seen in last_seen.items() if now - seen > 1)
            if dead:
                raise SlurmError(f"{', '.join(dead)} exited while starting\n{self.log_tails()}")
            return ready()

        if not _wait_until(done, timeout, 0.3):
            raise SlurmError(
                f"{what} after {timeout:.0f} s: {self._node_states() or 'sinfo does not answer'}\n{self.log_tails()}"
            )

    def _start_slurmctld(self) -> None:
        self._spawn_daemon("slurmctld", ["slurmctld", "-c", "-f", str(self.conf_path)])  # -c: clean state
        self._wait_ready("slurmctld does not answer `scontrol ping`", self._ctld_answers, ["slurmctld"], 20)

    def _start_slurmds(self) -> None:
        for node in self.nodes:
            self._spawn_daemon(f"slurmd-{node}", ["slurmd", "-N", node, "-f", str(self.conf_path)])
        self._wait_ready("nodes not idle", lambda: self._nodes_in({"idle"}), ["slurmctld", *self.nodes], 30)

    # -- munge ------------------------------------------------------------------------------

    @staticmethod
    def _munge_works() -> bool:
        if _which("munge") is None or _which("unmunge") is None:
            return False
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
            if cred.returncode != 0:
                return False
            return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    @property
    def _munge_mark(self) -> Path:
        """Holds the pid of a munged that we started (so stop() stops it, and only it)."""
        return self.base / "munged.pid"

    def _start_munge(self) -> None:
        """Reuse a munged that works; otherwise start one as user munge and remember its pid."""
        if self._munge_works():
            return
        MUNGE_RUN_DIR.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(MUNGE_RUN_DIR, "munge", "munge")
        if not MUNGE_KEY.exists():  # the package normally creates it
            _run(["mungekey", "--create"], user="munge", group="munge")
        with open(self.base / "munged.stderr", "wb") as err:
            proc = subprocess.run(
                [_which("munged")],
                user="munge",
                group="munge",
                extra_groups=[],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                timeout=30,
            )
        if proc.returncode != 0 or not _wait_until(self._munge_works, 10):
            raise SlurmError(
                f"munged did not start or `munge -n | unmunge` fails (exit {proc.returncode})\n"
                f"--- {self.base / 'munged.stderr'}\n{tail(self.base / 'munged.stderr')}\n"
                f"--- {MUNGE_LOG}\n{tail(MUNGE_LOG)}"
            )
        try:
            self._munge_mark.write_text(MUNGE_PID_FILE.read_text())
        except OSError as e:
            _log(f"munged runs but {MUNGE_PID_FILE} is unreadable ({e.strerror}): stop() will leave it running")

    def _our_munged(self) -> int | None:
        try:
            pid = int(self._munge_mark.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) and _comm(pid) == "munged" else None

    # -- stop -------------------------------------------------------------------------------

    def _our_daemons(self) -> dict[int, str]:
        """pid -> 'slurmctld' or the node name, for daemons running with our slurm.conf."""
        conf, found = str(self.conf_path), {}
        for pid in _all_pids():
            comm = _comm(pid)
            if comm in ("slurmctld", "slurmd") and _alive(pid):
                args = _cmdline(pid)
                if conf in args:  # we always start them with `-f <our conf>`
                    found[pid] = args[args.index("-N") + 1] if "-N" in args[:-1] else comm
        return found

    def _our_job_processes(self) -> list[int]:
        """slurmstepd, slurmscriptd and job processes of our cluster (with our SLURM_CONF).

        slurmstepd outlives a killed slurmd, and job processes outlive a killed slurmstepd, so
        after a crash they are found by environment. A process must also be a SLURM helper or carry
        SLURM_JOB_ID: a developer's shell that exported our SLURM_CONF is not a job.
        """
        conf, protected, found = str(self.conf_path), _self_and_ancestors(), []
        for pid in _all_pids():
            if pid in protected or not _alive(pid):
                continue
            env = _environ(pid)
            if env.get("SLURM_CONF") == conf and (_comm(pid) in SLURM_HELPERS or "SLURM_JOB_ID" in env):
                found.append(pid)
        return found

    def _kill_leftovers(self) -> tuple[list[int], list[int]]:
        """Stop every daemon, slurmstepd and job process of this base folder.

        Returns the pids it signalled, and those still alive after SIGKILL.
        """
        signalled, survivors = [], []
        for _ in range(3):  # look again: a process that forked during a look is not in it
            daemons, jobs = list(self._our_daemons()), self._our_job_processes()
            if not daemons and not jobs:
                break
            survivors = _terminate(daemons) + _terminate(jobs, grace=1)
            signalled += daemons + jobs
        return signalled, survivors

    def stop(self, remove: bool = True) -> None:
        """Cancel jobs, stop our daemons and our munged, remove the base folder (if `remove`).

        Safe to call at any time, also when nothing runs. Raises SlurmError only if a process of
        ours survives SIGKILL.
        """
        if self._our_daemons() and self._ctld_answers():
            try:  # let slurmstepd end the jobs' processes properly
                self.cancel_all(timeout=15)
            except SlurmError as e:
                _log(f"stop: {e} (killing instead)")
        killed, survivors = self._kill_leftovers()
        munged = self._our_munged()
        if munged:
            killed.append(munged)
            survivors += _terminate([munged])
        # The daemons are orphans, so dead ones stay zombies until PID 1 reaps them (this machine's
        # init does within about 2 s); wait a little so that `pgrep slurm` right after is empty.
        _wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in killed), 5)
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)
        if survivors:
            raise SlurmError(f"processes of the local cluster survived SIGKILL: {survivors}")

    # -- jobs -------------------------------------------------------------------------------

    def sbatch(self, args: list[str], env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None) -> int:
        """Submit a job (`sbatch --parsable ARGS`) and return its id.

        `env` adds to (or overrides) `env()`; the job gets that environment (sbatch's default
        --export=ALL). `cwd` is where sbatch runs, hence the job's default working directory.
        """
        proc = self.command(["sbatch", "--parsable", *args], env={**self.env(), **(env or {})}, cwd=cwd, timeout=30)
        return int(proc.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (JobState, ExitCode, Restarts, NodeList, Reason, StdOut, ...).

        JobState is its first word only; RestartCnt is added as another name for Restarts.
        """
        proc = self.command(["scontrol", "show", "job", "-o", str(job_id)])
        line = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
        info = parse_scontrol_line(line)
        if info.get("JobId") != str(job_id):
            raise SlurmError(f"scontrol does not know job {job_id}: {proc.stdout.strip() or proc.stderr.strip()}")
        info["JobState"] = info.get("JobState", "").split()[0]
        # scontrol calls the requeue count `Restarts` (the job sees it as SLURM_RESTART_COUNT).
        info.setdefault("RestartCnt", info.get("Restarts", "0"))
        return info

    def describe(self, job_id: int, info: dict[str, str] | None = None, lines: int = 30) -> str:
        """Key facts about a job and the tail of its output, for error messages."""
        try:
            info = info or self.job_info(job_id)
        except SlurmError as e:
            return str(e)
        keys = ("JobState", "Reason", "ExitCode", "Restarts", "NodeList", "Dependency", "StartTime", "EndTime")
        text = " ".join(f"{k}={info.get(k, '?')}" for k in keys)
        out, err = info.get("StdOut"), info.get("StdErr")
        text += f"\n--- {out} (last lines)\n{tail(out, lines)}"
        if err and err != out:
            text += f"\n--- {err} (last lines)\n{tail(err, lines)}"
        return text

    def wait_for(
        self, job_id: int, states: Iterable[str] = ("COMPLETED",), timeout: float = 60, reason: str | None = None
    ) -> dict[str, str]:
        """Poll until the job is in one of `states` (and has `reason`, if given); return its info.

        Raises SlurmError, with the job's info and output tail, on timeout or when the job reaches
        a terminal state that is not wanted.
        """
        states = set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            state = info["JobState"]
            if state in states and (reason is None or info.get("Reason") == reason):
                return info
            want = f"{'/'.join(sorted(states))}{f' (Reason={reason})' if reason else ''}"
            if state in TERMINAL_STATES and state not in states:
                raise SlurmError(f"job {job_id} ended {state}, wanted {want}\n{self.describe(job_id, info)}")
            if time.monotonic() >= deadline:
                raise SlurmError(f"job {job_id} not {want} after {timeout:.0f} s\n{self.describe(job_id, info)}")
            time.sleep(0.25)

    def squeue(self) -> list[dict[str, str]]:
        """Jobs not yet finished: [{'JobId', 'JobState', 'Reason', 'NodeList', 'JobName'}, ...]."""
        proc = self.command(["squeue", "--noheader", "--format=%i\t%T\t%r\t%N\t%j"])
        keys = ("JobId", "JobState", "Reason", "NodeList", "JobName")
        return [dict(zip(keys, line.split("\t", 4))) for line in proc.stdout.splitlines() if line.strip()]

    def cancel_all(self, timeout: float = 20) -> None:
        """Cancel every job in the queue and wait until none is left (running jobs end first)."""
        ids = [row["JobId"] for row in self.squeue()]
        if not ids:
            return
        self.command(["scancel", *ids], check=False)  # a job may just have ended
        if not _wait_until(lambda: not self.squeue(), timeout, 0.25):
            raise SlurmError(f"jobs still queued {timeout:.0f} s after scancel: {self.squeue()}")


# --------------------------------------------------------------------------------------------
# Command line for developers: python -m tests.slurm.cluster start|stop|status|env


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.slurm.cluster", description=__doc__.split("\n")[0])
    parser.add_argument(
        "command",
        choices=["start", "stop", "status", "env"],
        help="start (install if needed) or stop the local cluster, show its status, or print the line that points commands at it",
    )
    args = parser.parse_args(argv)
    cluster = LocalSlurm()
    try:
        if args.command == "start":
            cluster.ensure_installed()
            if not cluster.start():
                print("already up")
            (cluster.base / "started-by-hand").touch()
            print(cluster.status())
            print(f"\nuse it with: export SLURM_CONF={cluster.conf_path}")
        elif args.command == "stop":
            cluster.stop()
            print("stopped")
        elif args.command == "status":
            print(cluster.status())
        else:
            print(f"export SLURM_CONF={cluster.conf_path}")
    except SlurmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
