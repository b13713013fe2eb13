"""Smoke tests of the local SLURM cluster: each proves one capability slurm/continual.sh relies on.

Multi-node jobs (hostfile from the node list, one task per node), `afterok` chains (also one a job
submits for itself, passing state with --export), USR1 -> `scontrol requeue` -> a rerun that sees
SLURM_RESTART_COUNT and appends to the same log, and `--signal=B:USR1@N` reaching the batch script.
"""

from __future__ import annotations

import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from .cluster import LocalSlurm


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def wait_for_text(slurm: LocalSlurm, job: int, path: Path, text: str, timeout: float = 20) -> None:
    """Wait until the job's file contains `text` (e.g. the job has set its trap)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"no {text!r} in {path} after {timeout} s\n{slurm.describe(job)}"
        time.sleep(0.1)


@pytest.mark.parametrize("per_node", [1, 2])
def test_two_node_job_runs_tasks_on_both_nodes(slurm, tmp_path, per_node):
    script = write_script(
        tmp_path / "job.sh",
        """
        scontrol show hostnames "$SLURM_JOB_NODELIST" > hosts.txt   # how a hostfile is made
        # Single quotes: SLURM_PROCID and SLURMD_NODENAME must expand inside each task (docs/slurm.md).
        srun bash -c 'echo "$SLURM_PROCID $SLURMD_NODENAME"' > tasks.txt
    """,
    )
    job = slurm.sbatch(["--nodes=2", f"--ntasks-per-node={per_node}", "--output=job.out", str(script)], cwd=tmp_path)
    info = slurm.wait_for(job, timeout=30)

    assert info["NodeList"] == "node[1-2]"
    assert lines(tmp_path / "hosts.txt") == ["node1", "node2"]
    tasks = [line.split() for line in lines(tmp_path / "tasks.txt")]
    assert sorted(int(rank) for rank, _ in tasks) == list(range(2 * per_node))
    assert Counter(node for _, node in tasks) == {"node1": per_node, "node2": per_node}


def test_afterok_starts_the_next_job_only_after_the_first_completes(slurm, tmp_path):
    first = slurm.sbatch(
        ["--output=first.out", "--wrap", "echo first starts >> order.log; sleep 2; echo first ends >> order.log"],
        cwd=tmp_path,
    )
    second = slurm.sbatch(
        [f"--dependency=afterok:{first}", "--output=second.out", "--wrap", "echo second starts >> order.log"],
        cwd=tmp_path,
    )
    slurm.wait_for(first, {"RUNNING"}, timeout=15)
    slurm.wait_for(second, {"PENDING"}, reason="Dependency", timeout=5)

    slurm.wait_for(second, timeout=30)
    assert lines(tmp_path / "order.log") == ["first starts", "first ends", "second starts"]


def test_a_failed_job_never_starts_its_afterok_dependents(slurm, tmp_path):
    # Held until both dependents are queued, so the failure happens after their submission.
    first = slurm.sbatch(["--hold", "--output=first.out", "--wrap", "exit 3"], cwd=tmp_path)
    waits = slurm.sbatch([f"--dependency=afterok:{first}", "--wrap", "true"], cwd=tmp_path)
    killed = slurm.sbatch(
        [f"--dependency=afterok:{first}", "--kill-on-invalid-dep=yes", "--wrap", "true"], cwd=tmp_path
    )
    slurm.command(["scontrol", "release", str(first)])

    assert slurm.wait_for(first, {"FAILED"}, timeout=30)["ExitCode"] == "3:0"
    # Without --kill-on-invalid-dep the next job stays queued for ever: a broken chain is visible
    # in squeue, and must be cancelled (the fixture does).
    slurm.wait_for(waits, {"PENDING"}, reason="DependencyNeverSatisfied", timeout=15)
    slurm.wait_for(killed, {"CANCELLED"}, timeout=15)


def test_a_job_submits_its_successor(slurm, tmp_path):
    script = write_script(
        tmp_path / "chain.sh",
        """
        # State travels explicitly with --export; the job's own SLURM_* variables would leak into
        # the next job otherwise (docs/slurm.md). $0 is SLURM's spooled copy, so the path comes from outside.
        STEP=${STEP:-1}
        echo "step $STEP starts" >> chain.log
        if [ "$STEP" -lt 2 ]; then
            sbatch --parsable --dependency="afterok:$SLURM_JOB_ID" --export="ALL,STEP=$((STEP + 1))" \\
                --output=chain-%j.out "$CHAIN_SCRIPT" > next.id
            sleep 1  # the next job must still wait for this one to end
        fi
        echo "step $STEP ends (job $SLURM_JOB_ID)" >> chain.log
    """,
    )
    first = slurm.sbatch(["--output=chain-%j.out", str(script)], env={"CHAIN_SCRIPT": str(script)}, cwd=tmp_path)
    slurm.wait_for(first, timeout=30)
    second = int((tmp_path / "next.id").read_text())
    slurm.wait_for(second, timeout=30)

    assert lines(tmp_path / "chain.log") == [
        "step 1 starts",
        f"step 1 ends (job {first})",
        "step 2 starts",
        f"step 2 ends (job {second})",
    ]


# What slurm/continual.sh does on USR1 (time limit near, or preemption): requeue itself and stop.
REQUEUE_ON_USR1 = """
    RUN=${SLURM_RESTART_COUNT:-0}
    on_usr1() {
        echo "run $RUN: USR1"
        if [ "$RUN" = 0 ]; then scontrol requeue "$SLURM_JOB_ID"; fi
        exit 0
    }
    trap on_usr1 USR1
    echo "run $RUN: starts"
    if [ "$RUN" -ge 1 ]; then echo "run $RUN: done"; exit 0; fi
    echo "run $RUN: waiting for USR1"
    while true; do sleep 0.2; done   # a trap runs between commands: keep them short
"""


def test_usr1_requeues_the_job_and_the_rerun_sees_the_restart(slurm, tmp_path):
    """USR1 sent with `scancel --signal=USR1 --batch`, as a preemption notice arrives.

    Immediate, unlike `--signal=B:USR1@N` (next test), so this test takes about 12 s: the rerun
    may start only `cred_expire + 1` = 11 s after the requeue (conf.py).
    """
    script = write_script(tmp_path / "requeue.sh", REQUEUE_ON_USR1)
    job = slurm.sbatch(["--requeue", "--open-mode=append", "--output=job.log", str(script)], cwd=tmp_path)
    wait_for_text(slurm, job, tmp_path / "job.log", "waiting for USR1")  # the trap is set
    slurm.command(["scancel", "--signal=USR1", "--batch", str(job)])

    info = slurm.wait_for(job, timeout=60)
    assert info["Restarts"] == "1"
    # --open-mode=append: both runs in one log. slurmstepd may add a line of its own there
    # ("*** JOB n ON node1 CANCELLED AT ... DUE TO JOB REQUEUE ***") when the requeue's kill
    # reaches the script before its `exit 0` does.
    script_lines = [line for line in lines(tmp_path / "job.log") if not line.startswith("slurmstepd")]
    assert script_lines == ["run 0: starts", "run 0: waiting for USR1", "run 0: USR1", "run 1: starts", "run 1: done"]


@pytest.mark.slow
def test_signal_option_delivers_usr1_to_the_batch_script_before_the_time_limit(slurm, tmp_path):
    """`--signal=B:USR1@59 --time=1`: USR1 reaches the batch shell's trap, not only job steps.

    USR1 is due 1 s after the start (59 s before the 1-minute limit); but slurmctld checks time
    limits only every 30 s (a fixed period in its background loop), so it arrives 1-31 s after
    the start, and this test takes as long. @59 rather than e.g. @50 saves 9 s and proves the
    same; not @60, which could signal the script before its trap is set. What the trap then does
    (requeue) is the previous test.
    """
    script = write_script(
        tmp_path / "timed.sh",
        """
        trap 'echo "USR1 after ${SECONDS} s"; exit 0' USR1
        echo "waiting for USR1"
        while true; do sleep 0.2; done
    """,
    )
    job = slurm.sbatch(["--time=1", "--signal=B:USR1@59", "--output=job.log", str(script)], cwd=tmp_path)

    info = slurm.wait_for(job, timeout=50)
    assert lines(tmp_path / "job.log")[-1].startswith("USR1 after"), slurm.describe(job, info)
