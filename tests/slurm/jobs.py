"""Jobs on the local cluster: submit, read `scontrol show job`, wait for a state, cancel."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from launcher.slurm import parse_scontrol_line

from .shell import SlurmError, tail, wait_until

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


# What a job asked for, as `scontrol show job -o` records it (the next job of a chain must record
# the same; NumNodes is "2-2" while pending and "2" once running).
REQUEST_FIELDS = (
    "JobName",
    "Command",
    "NumNodes",
    "NumTasks",
    "NtasksPerN:B:S:C",
    "Socks/Node",
    "CPUs/Task",
    "TimeLimit",
    "Partition",
    "Account",
    "QOS",
    "Features",
    "Reservation",
    "TresPerJob",
    "TresPerNode",
    "TresPerTask",
    "TresPerSocket",
    "CpusPerTres",
    "MemPerTres",
    "MinMemoryNode",
    "MinMemoryCPU",
    "StdOut",
    "StdErr",
)


class JobControl:
    """The job commands of LocalSlurm (a mixin: it needs `command()` and `env()` of SlurmConf)."""

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

    def request(self, job_id: int, info: dict[str, str] | None = None) -> dict[str, str]:
        """The REQUEST_FIELDS of a job's record (absent ones as None; NumNodes as one number)."""
        info = info or self.job_info(job_id)
        request = {key: info.get(key) for key in REQUEST_FIELDS}
        request["NumNodes"] = request["NumNodes"].split("-")[0]
        return request

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
        if not wait_until(lambda: not self.squeue(), timeout, 0.25):
            raise SlurmError(f"jobs still queued {timeout:.0f} s after scancel: {self.squeue()}")
