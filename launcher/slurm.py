"""One SLURM job = one period (`slurm/continual.sh` runs `python -m launcher slurm-step`).

Inside the allocation: the next period comes from the run's state.json; the ranks are one
`srun` task each (every node runs its share, SLURM places them), with MASTER_ADDR the first
node's address and a free port there; train/main.py reads its rank from SLURM. A hostfile
(`scontrol show hostnames`, slots per node) is written for anyone who prefers
`deepspeed --hostfile`. Commands are argument lists, never shell strings built from input.

Afterwards (`period_outcome`): success -> submit this script again for the next period with
`--dependency=afterok:<this job>` and what this job asked for, read from its
`scontrol show job -o` record (`job_request`; or write the report when all periods are done);
a checkpoint on a signal (exit 75, or any code when rank 0 wrote phase "stopped" for this period
since the period started) -> `scontrol requeue` this job, which resumes the period; a failure
-> stop the chain with a message; resubmitting continues from that period.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from launcher.periods import MAIN, RunSettings, remaining_periods, stopped_on_signal
from launcher.report import write_report
from train.common.exit_codes import EXIT_REQUEUE, EXIT_USAGE
from train.common.launch_env import free_port, tasks_per_node

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


class ResubmitError(RuntimeError):
    """The next job of the chain cannot be submitted as this job was (see `job_request`)."""


def _is_set(value: str | None) -> bool:
    return bool(value) and value not in ("(null)", "N/A", "*")


def _tres(value: str | None) -> list[tuple[str, str]]:
    """A Tres field of `scontrol show job` as (name, rest) pairs, in order:
    `gres:gpu:2,gres:gpu:a100:1,gres:nvme:1` (SLURM 22.05; later versions write `gres/gpu:2`)
    -> [("gpu", "2"), ("gpu", "a100:1"), ("nvme", "1")]; a TRES that is not a GRES (`cpu:8`,
    `cpu=8`) -> ("cpu", "8")."""
    pairs = []
    for item in (value or "").split(","):
        item = item.strip()
        if not _is_set(item):
            continue
        m = re.fullmatch(r"gres[:/]([^:=]+)[:=](.+)", item) or re.fullmatch(r"([^:=/]+)[:=](.+)", item)
        if not m:
            raise ResubmitError(f"cannot read {item!r} of {value!r}")
        pairs.append((m.group(1), m.group(2)))
    return pairs


def _gpu_only(fields: dict, key: str, option: str, allowed: tuple[str, ...] = ()) -> list[str]:
    """`option=<count>` for each GPU entry of the Tres field `key`; any other GRES in it cannot be
    carried (there is no option for it), except the TRES named in `allowed`."""
    options = []
    for name, rest in _tres(fields.get(key)):
        if name == "gpu":
            options.append(f"{option}={rest}")
        elif name not in allowed:
            raise ResubmitError(f"{key}={fields[key]}: {name!r} has no sbatch option to ask for it again")
    return options


def _megabytes(value: str) -> str:
    """`1537M`, `2G`, `0` (scontrol's memory) -> megabytes, as sbatch's --mem takes them."""
    m = re.fullmatch(r"([\d.]+)([KMGTP]?)", value)
    if not m:
        raise ResubmitError(f"cannot read the memory {value!r}")
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2, "P": 1024**3}[m.group(2)]
    return str(round(float(m.group(1)) * scale))


def job_request(fields: dict) -> list[str]:
    """The sbatch options that ask for what this job had, from its `scontrol show job -o` fields.

    field                    -> option
    JobName                  -> --job-name
    NumNodes (2, or 2-2)     -> --nodes
    NumTasks                 -> --ntasks
    NtasksPerN:B:S:C (N:..)  -> --ntasks-per-node=N (unless 0)
    Socks/Node (unless *)    -> --sockets-per-node
    TimeLimit                -> --time
    Partition, Account, QOS, Features, Reservation
                             -> --partition, --account, --qos, --constraint, --reservation
    TresPerNode              -> its first GPU entry --gpus-per-node, the other entries --gres
                                (SLURM lists --gpus-per-node first, then --gres)
    TresPerJob               -> --gpus          (gres:gpu:16 -> 16; gres:gpu:a100:16 -> a100:16)
    TresPerTask              -> --gpus-per-task (a `cpu` entry there is CPUs/Task's)
    TresPerSocket            -> --gpus-per-socket
    CpusPerTres (gpu)        -> --cpus-per-gpu, else CPUs/Task -> --cpus-per-task
    MemPerTres (gpu)         -> --mem-per-gpu, else MinMemoryCPU -> --mem-per-cpu,
                                else MinMemoryNode -> --mem (0 too: a job without --mem and
                                without a default records 0, and --mem=0 asks for the same)
    StdOut, StdErr           -> --output, --error

    The options override the script's own `#SBATCH` lines only for the same option: the
    script's `--gpus-per-node` default is in the record as the first TresPerNode entry (with
    the user's `--gpus-per-node=0`: `gres:gpu:0`), so it is always given again here, as it was.
    A Tres field, Account, Features or Reservation is in the record only where the job (or its
    script) asked for it, so the next job records the same. Raises ResubmitError for what no
    option can ask for again.
    """
    return [
        *_job_shape(fields),
        *_gpu_request(fields),
        *_cpu_request(fields),
        *_memory_request(fields),
        *(
            f"{option}={fields[key]}"
            for key, option in (("StdOut", "--output"), ("StdErr", "--error"))
            if fields.get(key)
        ),
    ]


def _job_shape(fields: dict) -> list[str]:
    """Name, nodes, time, tasks and where the job runs (partition, account, QOS, ...)."""
    opts = [
        f"--job-name={fields['JobName']}",
        f"--nodes={fields['NumNodes'].split('-')[0]}",
        f"--time={fields['TimeLimit']}",
    ]
    if fields.get("NumTasks", "").isdigit():
        opts.append(f"--ntasks={fields['NumTasks']}")
    per_node = fields.get("NtasksPerN:B:S:C", "").split(":")[0]
    if per_node.isdigit() and per_node != "0":
        opts.append(f"--ntasks-per-node={per_node}")
    if fields.get("Socks/Node", "").isdigit():
        opts.append(f"--sockets-per-node={fields['Socks/Node']}")
    for key, option in (
        ("Partition", "--partition"),
        ("Account", "--account"),
        ("QOS", "--qos"),
        ("Features", "--constraint"),
        ("Reservation", "--reservation"),
    ):
        if _is_set(fields.get(key)):
            opts.append(f"{option}={fields[key]}")
    return opts


def _gpu_request(fields: dict) -> list[str]:
    """GPUs per node (and the other GRES per node), per job, per task and per socket."""
    opts = []
    gres = _tres(fields.get("TresPerNode"))
    first_gpu = next((i for i, (name, _) in enumerate(gres) if name == "gpu"), None)
    if first_gpu is not None:
        opts.append(f"--gpus-per-node={gres.pop(first_gpu)[1]}")
    if gres:
        opts.append("--gres=" + ",".join(f"{name}:{rest}" for name, rest in gres))
    opts += _gpu_only(fields, "TresPerJob", "--gpus")
    opts += _gpu_only(fields, "TresPerTask", "--gpus-per-task", allowed=("cpu",))
    opts += _gpu_only(fields, "TresPerSocket", "--gpus-per-socket")
    return opts


def _cpu_request(fields: dict) -> list[str]:
    cpus_per_gpu = _gpu_only(fields, "CpusPerTres", "--cpus-per-gpu")
    if cpus_per_gpu:  # SLURM refuses it beside --cpus-per-task, which the record shows anyway
        return cpus_per_gpu
    if fields.get("CPUs/Task", "").isdigit():
        return [f"--cpus-per-task={fields['CPUs/Task']}"]
    return []


def _memory_request(fields: dict) -> list[str]:
    mem_per_gpu = _gpu_only(fields, "MemPerTres", "--mem-per-gpu")
    if mem_per_gpu:  # --mem, --mem-per-cpu and --mem-per-gpu exclude each other
        return mem_per_gpu
    if _is_set(fields.get("MinMemoryCPU")):
        return [f"--mem-per-cpu={_megabytes(fields['MinMemoryCPU'])}"]
    if _is_set(fields.get("MinMemoryNode")):
        return [f"--mem={_megabytes(fields['MinMemoryNode'])}"]
    return []


def next_job_command(fields: dict, script: str) -> list[str]:
    """Resubmit `script` for the next period: after this job succeeds, asking for what it had."""
    return [
        "sbatch",
        "--parsable",
        f"--dependency=afterok:{fields['JobId']}",
        "--export=ALL",
        *job_request(fields),
        script,
    ]


def _clean_env() -> dict:
    """This job's environment without its SLURM_* identity, which a nested sbatch would inherit
    (SLURM_CONF, which names the cluster, stays), nor SBATCH_*/SRUN_* settings: the next job asks
    for what this job's record says, and nothing else adds to it."""
    return {
        k: v for k, v in os.environ.items() if k == "SLURM_CONF" or not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
    }


def submit_next_job(job: str) -> str:
    """Submit this job's script (`Command`) again for the next period; returns the new job's id.
    Raises ResubmitError, with sbatch's own message, when it cannot be submitted."""
    fields = job_fields(job)
    cmd = next_job_command(fields, fields["Command"])
    proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ResubmitError(f"`{shlex.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]  # --parsable: `id` or `id;cluster`


def period_outcome(code: int, run: str, period: int, since: float) -> str:
    """'done', 'requeue' (the period checkpointed on a signal) or 'failed', from srun's exit code
    and the run's state. With --kill-on-bad-exit=1 the first rank that exits 75 makes SLURM stop
    the others (SIGTERM, SIGKILL after KillWait), and srun then returns 128 + that signal (or the
    code of another rank) instead of 75: rank 0's phase "stopped" in state.json, written since
    `since` after the checkpoint, says what happened (as for torchrun's 1 in run_local)."""
    if code == 0:
        return "done"
    if code == EXIT_REQUEUE or stopped_on_signal(run, period, since):
        return "requeue"
    return "failed"


def slurm_step(settings: RunSettings) -> int:
    """Train the run's next period on this job's allocation, then chain: the next job, a requeue
    of this one, or the report when every period is done; returns this step's exit code."""
    run = settings.run_dir
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        raise SystemExit("slurm-step runs inside a SLURM job (sbatch slurm/continual.sh)")
    left = remaining_periods(settings.data, run)
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
    started = time.time()
    proc = subprocess.Popen(srun_command(settings.train_args(period)), env=env)

    def forward(signum, frame):  # SIGUSR1 before the time limit, SIGTERM on preemption
        log.warning(f"== job {job}: signal {signal.Signals(signum).name}: asking every rank to checkpoint")
        proc.send_signal(signal.SIGUSR1)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    code = proc.wait()
    outcome = period_outcome(code, run, period, started)
    if outcome == "requeue":
        how = "" if code == EXIT_REQUEUE else f" (srun exit code {code}, state.json: stopped)"
        log.info(f"== job {job}: period {period} checkpointed{how}; requeueing this job to resume it")
        scontrol("requeue", job)
        return 0
    if outcome == "failed" and code == EXIT_USAGE:  # train/main.py printed its one `error:` line
        log.error(
            f"== job {job}: period {period} refused its inputs (the error above). The chain stops here; fix it "
            "and resubmit the same sbatch command: finished periods are kept."
        )
        return code
    if outcome == "failed":
        log.error(
            f"== job {job}: period {period} FAILED (exit code {code}). The chain stops here; fix the cause and "
            f"resubmit the same sbatch command: finished periods are kept and period {period} resumes."
        )
        return code
    return _after_period_done(job, run, left)


def _after_period_done(job: str, run: str, left: list[int]) -> int:
    """Period `left[0]` is done: submit the job for the next one, or write the report after the
    last; returns the step's exit code."""
    period = left[0]
    if len(left) > 1:
        try:
            nxt = submit_next_job(job)
        except ResubmitError as e:
            log.error(
                f"== job {job}: period {period} done, but the job for period {left[1]} was not submitted: {e}. "
                "Submit the same sbatch command again to continue: finished periods are kept."
            )
            return 1
        log.info(f"== job {job}: period {period} done; submitted job {nxt} for period {left[1]}")
    else:
        _final_report(run)
    return 0


def _final_report(run: str) -> None:
    text = write_report(run)
    log.info(f"== all periods done; report in {run}/report.md and report.png")
    print(text, flush=True)
