"""The local cluster's slurm.conf, its folders, and the environment that points SLURM commands at it.

The facts below were measured on this machine type; see docs/slurm.md, "The local test cluster"
("the notes").

Settings that are not obvious (slurm.conf, see `SlurmConf.config_text`)
-----------------------------------------------------------------------
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
- GPUs as a generic resource on nodes without GPUs: `GresTypes=gpu`, `Gres=gpu:2` on every node,
  and a `gres.conf` beside slurm.conf (`AutoDetect=off`, `NodeName=... Name=gpu
  File=<base>/dev/nvidia[0-1]`) whose files are links to /dev/null, made before slurmd starts
  (`LocalSlurm._prepare_base`). `File=` is required: a `Count=`-only gpu line is dropped and the
  nodes go INVAL; missing files make slurmd exit; regular files schedule but set no
  `CUDA_VISIBLE_DEVICES`; links to /dev/null give jobs `CUDA_VISIBLE_DEVICES` and
  `SLURM_JOB_GPUS` as on a GPU node. Jobs can then ask for GPUs in every style (`--gpus`,
  `--gpus-per-node`, `--gres=gpu:N`, `--gpus-per-task`, `--cpus-per-gpu`, `--mem-per-gpu`) and
  `scontrol show job` records them (TresPerJob, TresPerNode, TresPerTask, CpusPerTres,
  MemPerTres) as on a GPU cluster. Nothing runs on a GPU: the processes use the CPU.
- `Features=loopback,fakegpu` on every node, so that a job can ask for `--constraint`.
- `PlugStackConfig` points to an empty file of ours so no SPANK plugin configured system-wide is
  loaded; every command gets `SLURM_CONF` (see `env()`) so no other slurm.conf is read.
- `slurmctld -c` starts from a clean state (notes): no jobs from an earlier session come back.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .shell import SEARCH_PATH, SlurmError, run

# Environment prefixes that change what the SLURM commands do (SBATCH_PARTITION, SQUEUE_FORMAT,
# or a SLURM_JOB_ID when the tests themselves run inside a job on a real cluster).
SLURM_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCONTROL_")


# Every node's features (`--constraint=loopback` matches both nodes).
FEATURES = ("loopback", "fakegpu")


class SlurmConf:
    """slurmctld + `nodes` slurmd on this machine, configured under `base`: the config, the
    folders and logs, and running SLURM client commands against it."""

    def __init__(
        self,
        base: str | os.PathLike | None = None,
        *,
        nodes: int = 2,
        cpus_per_node: int = 2,
        gpus_per_node: int = 2,
        port: int | None = None,
    ):
        self.base = Path(base or os.environ.get("PESO_SLURM_BASE") or "/tmp/peso-slurm").absolute()
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node
        self.gpus_per_node = gpus_per_node
        # slurmctld listens on `port`, node i on `port + i`.
        self.port = int(port or os.environ.get("PESO_SLURM_PORT") or 16817)
        self.conf_path = self.base / "slurm.conf"
        self.gres_conf_path = self.base / "gres.conf"  # slurmd reads it beside slurm.conf
        self.log_dir = self.base / "log"
        self.ctld_log = self.log_dir / "slurmctld.log"
        self.hostname = socket.gethostname().split(".")[0]

    def slurmd_log(self, node: str) -> Path:
        return self.log_dir / f"slurmd-{node}.log"

    def config_text(self) -> str:
        b = self.base
        first, last = self.port + 1, self.port + len(self.nodes)
        node_range = f"node[1-{len(self.nodes)}]" if len(self.nodes) > 1 else "node1"
        port_range = f"[{first}-{last}]" if last > first else str(first)
        return "\n".join(
            [
                "# Generated by tests/slurm/conf.py; each setting is explained in its docstring.",
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
                "GresTypes=gpu",
                f"NodeName={node_range} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port_range} "
                f"CPUs={self.cpus_per_node} RealMemory={self._memory_per_node_mb()} Gres=gpu:{self.gpus_per_node} "
                f"Features={','.join(FEATURES)} State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    @property
    def gpu_files(self) -> list[Path]:
        """The nodes' "GPU" device files: links to /dev/null (shared by the nodes: one machine)."""
        return [self.base / "dev" / f"nvidia{i}" for i in range(self.gpus_per_node)]

    def gres_text(self) -> str:
        """gres.conf: the GPUs of every node, backed by `gpu_files` (no autodetection: there are none)."""
        node_range = f"node[1-{len(self.nodes)}]" if len(self.nodes) > 1 else "node1"
        files = (
            f"{self.base}/dev/nvidia[0-{self.gpus_per_node - 1}]" if self.gpus_per_node > 1 else str(self.gpu_files[0])
        )
        return f"# Generated by tests/slurm/conf.py.\nAutoDetect=off\nNodeName={node_range} Name=gpu File={files}\n"

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
        return run(args, env=kwargs.pop("env", None) or self.env(), timeout=timeout, check=check, **kwargs)

    def daemon_env(self) -> dict[str, str]:
        # Minimal on purpose: daemons (and the slurmstepd they fork) carry SLURM_CONF, which is
        # also how stop() recognises a slurmstepd of ours.
        return {"PATH": SEARCH_PATH, "SLURM_CONF": str(self.conf_path), "LANG": "C.UTF-8"}
