"""A real, throwaway SLURM cluster on this machine, so tests can run `sbatch slurm/continual.sh`.

What it is
----------
One `slurmctld` and two `slurmd` (nodes `node1` and `node2`, both on 127.0.0.1 with different
ports, 2 CPUs and 2 "GPUs" each: a generic resource backed by links to /dev/null, see conf.py),
authenticated by `munge`. Everything the daemons write (slurm.conf, gres.conf, the GPU device
links, state, one spool folder per node, logs, pid files) lives in one base folder, by default
`/tmp/peso-slurm` (`PESO_SLURM_BASE` or `LocalSlurm(base=...)` changes it). The base folder is
fixed rather than random so that a later session finds, reuses or cleans up what an earlier one
left behind. Jobs
run as root on this machine, so the job's working directory and files are shared between the
"nodes" by construction. It is the stock SLURM 22.05 of Debian 12, not a mock: sbatch, srun,
dependencies, signals and requeue behave as on a production cluster, only smaller.

The parts, one module each: `conf.py` (slurm.conf, with every setting that is not obvious
explained, the folders, the commands' environment), `install.py` (Debian packages), `munge.py`,
`procs.py` (which processes are ours, read from /proc, and stopping them), `jobs.py` (submit,
poll, cancel) and `shell.py` (running commands, errors). This module stands the cluster up and
takes it down. The facts were measured on this machine type; see docs/slurm.md, "The local test
cluster".

- slurmd logs PMIx and hwloc errors: harmless.
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

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from train.common.launch_env import free_port

from . import install, procs
from .conf import SlurmConf
from .jobs import JobControl
from .munge import munge_works, our_munged, start_munge
from .shell import SlurmError, SlurmUnavailable, say, tail, wait_until, which

__all__ = ["LocalSlurm", "SlurmError", "SlurmUnavailable", "tail"]


class LocalSlurm(SlurmConf, JobControl):
    """slurmctld + `nodes` slurmd (+ munge) on this machine, configured under `base`."""

    # -- installation -----------------------------------------------------------------------

    missing_commands = staticmethod(install.missing_commands)

    def ensure_installed(self) -> None:
        """Install SLURM and munge if their commands are missing (install.ensure_installed)."""
        install.ensure_installed()

    # -- state ------------------------------------------------------------------------------

    @property
    def started_by_hand(self) -> bool:
        """True if `python -m tests.slurm.cluster start` made it: test sessions leave it running."""
        return (self.base / "started-by-hand").exists()

    def is_up(self) -> bool:
        """Our config is in place, munge works, our daemons run and every node responds."""
        try:
            same_config = self.conf_path.read_text() == self.config_text()
            same_config = same_config and self.gres_conf_path.read_text() == self.gres_text()
        except OSError:
            return False
        daemons = self._our_daemons()
        return (
            same_config
            and munge_works()
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
            f"munge:   {'works' if munge_works() else 'not working'}",
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
        say(f"starting slurmctld + {len(self.nodes)} slurmd under {self.base}")
        t0 = time.monotonic()
        try:
            survivors = self._kill_leftovers()[1]  # an earlier, crashed session on this base folder
            if survivors:
                raise SlurmError(f"processes of an earlier cluster on {self.base} survived SIGKILL: {survivors}")
            self.base.mkdir(parents=True, exist_ok=True)
            start_munge(self._munge_mark, self.base / "munged.stderr")
            self._prepare_base()
            self._check_ports_free()
            self._start_slurmctld()
            self._start_slurmds()
        except BaseException:
            try:
                self.stop(remove=False)
            except SlurmError as e:  # keep the original error; this one only adds to it
                say(f"cleaning up after the failed start: {e}")
            raise
        say(f"up in {time.monotonic() - t0:.1f} s: nodes {', '.join(self.nodes)} idle")
        return True

    def _prepare_base(self) -> None:
        """A fresh config and empty state/spool/log/run/dev folders (keeping the munge ownership mark)."""
        for sub in ("state", "spool", "log", "run", "dev"):
            shutil.rmtree(self.base / sub, ignore_errors=True)
            (self.base / sub).mkdir(parents=True)
        for node in self.nodes:  # slurmd does not create its spool folder
            (self.base / "spool" / node).mkdir()
        for gpu in self.gpu_files:  # before slurmd starts: it exits when a gres.conf File= is missing
            gpu.symlink_to("/dev/null")
        self.gres_conf_path.write_text(self.gres_text())
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
                [which(args[0]), *args[1:]],
                env=self.daemon_env(),
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

        if not wait_until(done, timeout, 0.3):
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

    @property
    def _munge_mark(self) -> Path:
        """Holds the pid of a munged that we started (so stop() stops it, and only it)."""
        return self.base / "munged.pid"

    # -- stop -------------------------------------------------------------------------------

    def _our_daemons(self) -> dict[int, str]:
        """pid -> 'slurmctld' or the node name, for daemons running with our slurm.conf."""
        return procs.daemons_of(str(self.conf_path))

    def _our_job_processes(self) -> list[int]:
        """slurmstepd, slurmscriptd and job processes of our cluster (with our SLURM_CONF)."""
        return procs.job_processes_of(str(self.conf_path))

    def _kill_leftovers(self) -> tuple[list[int], list[int]]:
        """Stop every daemon, slurmstepd and job process of this base folder.

        Returns the pids it signalled, and those still alive after SIGKILL.
        """
        signalled, survivors = [], []
        for _ in range(3):  # look again: a process that forked during a look is not in it
            daemons, jobs = list(self._our_daemons()), self._our_job_processes()
            if not daemons and not jobs:
                break
            survivors = procs.terminate(daemons) + procs.terminate(jobs, grace=1)
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
                say(f"stop: {e} (killing instead)")
        killed, survivors = self._kill_leftovers()
        munged = our_munged(self._munge_mark)
        if munged:
            killed.append(munged)
            survivors += procs.terminate([munged])
        # The daemons are orphans, so dead ones stay zombies until PID 1 reaps them (this machine's
        # init does within about 2 s); wait a little so that `pgrep slurm` right after is empty.
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in killed), 5)
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)
        if survivors:
            raise SlurmError(f"processes of the local cluster survived SIGKILL: {survivors}")


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
