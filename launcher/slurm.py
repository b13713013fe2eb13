"""One SLURM job = one period (`slurm/continual.sh` runs `python -m launcher slurm-step`).

Inside the allocation: the next period comes from the run's state.json; the ranks are one
`srun` task each (every node runs its share, SLURM places them), with MASTER_ADDR the first
node's address and a free port there; train/main.py reads its rank from SLURM. A hostfile
(`scontrol show hostnames`, slots per node) is written for anyone who prefers
`deepspeed --hostfile`. Commands are argument lists, never shell strings built from input.

Afterwards: success -> submit this script again for the next period with
`--dependency=afterok:<this job>` and the same resources (or write the report when all periods
are done); a checkpoint on a signal (exit 75) -> `scontrol requeue` this job, which resumes the
period; a failure -> stop the chain with a message; resubmitting continues from that period.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys

from launcher.periods import MAIN, remaining_periods, train_args
from launcher.report import write_report
from train.exit_codes import EXIT_REQUEUE
from train.launch_env import free_port, tasks_per_node

log = logging.getLogger(__name__)

FORWARDED = (signal.SIGUSR1, signal.SIGTERM)


def scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True).stdout


def parse_scontrol_line(line: str) -> dict[str, str]:
    """`Key=value Key2=value two ...` (one line of `scontrol show ... -o`) to a dict.

    Values may contain spaces (a job name, a command with arguments), so a field ends only where
    the next ` Key=` begins.
    """
    matches = list(re.finditer(r"(?:^|\s)([A-Za-z][\w:/]*)=", line))
    fields = {}
    for m, nxt in zip(matches, matches[1:] + [None]):
        end = nxt.start() if nxt else len(line)
        fields[m.group(1)] = line[m.end() : end].strip()
    return fields


def job_fields(job_id: str) -> dict:
    """`scontrol show job -o` as a dict (Command=, TimeLimit=, NumNodes=, ...)."""
    return parse_scontrol_line(scontrol("show", "job", "-o", job_id).strip())


def hostnames() -> list[str]:
    return scontrol("show", "hostnames", os.environ["SLURM_JOB_NODELIST"]).split()


def node_address(name: str) -> str:
    """A node's address as SLURM knows it (NodeAddr: resolvable even where the name is not)."""
    return parse_scontrol_line(scontrol("show", "node", "-o", name).strip()).get("NodeAddr") or name


def write_hostfile(run: str, hosts: list[str], slots: int) -> str:
    path = os.path.join(run, "hostfile")
    os.makedirs(run, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(f"{h} slots={slots}\n" for h in hosts)
    return path


def srun_command(args: list[str]) -> list[str]:
    """One task per rank over the whole allocation; a failing rank stops the others."""
    return ["srun", "--kill-on-bad-exit=1", "--export=ALL", sys.executable, MAIN, *args]


def next_job_command(fields: dict, script: str) -> list[str]:
    """Resubmit `script` for the next period with this job's resources."""
    cmd = [
        "sbatch",
        "--parsable",
        f"--dependency=afterok:{fields['JobId']}",
        f"--job-name={fields['JobName']}",
        f"--nodes={fields['NumNodes'].split('-')[0]}",
        f"--time={fields['TimeLimit']}",
        "--export=ALL",
    ]
    if fields.get("Partition"):
        cmd.append(f"--partition={fields['Partition']}")
    m = re.match(r"(\d+)", fields.get("NtasksPerN:B:S:C", ""))
    if m and m.group(1) != "0":
        cmd.append(f"--ntasks-per-node={m.group(1)}")
    else:
        cmd.append(f"--ntasks={fields['NumTasks']}")
    gpus = re.search(r"gres[/:]gpu(?::[^:=,]+)?[:=](\d+)", fields.get("TresPerNode", ""))
    cmd.append(f"--gpus-per-node={gpus.group(1) if gpus else 0}")  # 0 overrides the script's own request
    if fields.get("CPUs/Task"):
        cmd.append(f"--cpus-per-task={fields['CPUs/Task']}")
    for key, opt in (("StdOut", "--output"), ("StdErr", "--error")):
        if fields.get(key):
            cmd.append(f"{opt}={fields[key]}")
    return cmd + [script]


def _clean_env() -> dict:
    """This job's environment without its SLURM_* identity, which a nested sbatch would inherit
    (SLURM_CONF, which names the cluster, stays)."""
    return {
        k: v for k, v in os.environ.items() if k == "SLURM_CONF" or not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
    }


def slurm_step(config: str, data: str, run: str, ds_config: str, overrides: list[str]) -> int:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        raise SystemExit("slurm-step runs inside a SLURM job (sbatch slurm/continual.sh)")
    left = remaining_periods(data, run)
    if not left:
        _final_report(run)
        return 0
    period = left[0]
    hosts = hostnames()
    write_hostfile(run, hosts, tasks_per_node())
    env = dict(os.environ, MASTER_ADDR=node_address(hosts[0]), MASTER_PORT=str(free_port()))
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    log.info(
        f"== job {job} (restart {restarts}): period {period} on {len(hosts)} node(s) {','.join(hosts)}, "
        f"{os.environ.get('SLURM_NTASKS', '?')} ranks"
    )
    proc = subprocess.Popen(srun_command(train_args(config, data, run, ds_config, overrides, period)), env=env)

    def forward(signum, frame):  # SIGUSR1 before the time limit, SIGTERM on preemption
        log.warning(f"== job {job}: signal {signal.Signals(signum).name}: asking every rank to checkpoint")
        proc.send_signal(signal.SIGUSR1)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    code = proc.wait()
    if code == EXIT_REQUEUE:
        log.info(f"== job {job}: period {period} checkpointed; requeueing this job to resume it")
        scontrol("requeue", job)
        return 0
    if code != 0:
        log.error(
            f"== job {job}: period {period} FAILED (exit code {code}). The chain stops here; fix the cause and "
            f"resubmit the same sbatch command: finished periods are kept and period {period} resumes."
        )
        return code
    if len(left) > 1:
        fields = job_fields(job)
        nxt = subprocess.run(
            next_job_command(fields, fields["Command"]), env=_clean_env(), check=True, capture_output=True, text=True
        ).stdout.strip()
        log.info(f"== job {job}: period {period} done; submitted job {nxt} for period {left[1]}")
    else:
        _final_report(run)
    return 0


def _final_report(run: str) -> None:
    text = write_report(run)
    log.info(f"== all periods done; report in {run}/report.md and report.png")
    print(text, flush=True)
