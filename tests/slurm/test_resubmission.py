"""The chain's next job asks for what this job had: every GPU request style, CPUs and memory per
GPU, account, constraint, memory, reservation (launcher/slurm.py `job_request`).

Each test submits, on the real local cluster (2 nodes with 2 GRES "GPUs" each, conf.py), a
batch script that has slurm/continual.sh's own `#SBATCH` lines (read from it, so its
`--gpus-per-node` and `--cpus-per-task` defaults apply as they do to the chain) and that runs
the launcher's resubmission (`submit_next_job`) for its own job, then waits. The next job stays
pending on its `afterok` dependency; its `scontrol show job -o` record must ask for what the
first job's record says, field by field. No training: each test takes a few seconds.

Whether a period that srun reports with another code than 75 is taken as a checkpoint on a signal
(`period_outcome`) is checked on a real run's state.json in test_continual.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from .cluster import LocalSlurm
from .shell import wait_until

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "continual.sh"
RESERVATION = "peso_resubmit"

# The resubmission of slurm-step, for this job; the first job then waits to be cancelled so that
# its successor stays pending (a successor that ran would submit another).
BODY = """
"$PESO_PYTHON" -c 'import os; from launcher.slurm import submit_next_job; print(submit_next_job(os.environ["SLURM_JOB_ID"]))' \\
    > next.tmp && mv next.tmp next.id
sleep 300
"""

# What every case asks for beside its GPUs (the account needs no accounting database; a QOS is
# dropped without one, QOS=(null), so it cannot be checked here).
COMMON = [
    "--nodes=2",
    "--ntasks-per-node=1",
    "--time=5",
    "--account=peso-acct",
    "--constraint=loopback&fakegpu",
    f"--reservation={RESERVATION}",
    "--output=first-%j.out",
]

# name -> (options beside COMMON, what the first job's record must show, the script's #SBATCH
# lines to leave out). Options that the script's own lines would contradict are given, as a
# user must give them: --gpus-per-node=0 to use another GPU style than the script's default.
CASES = {
    "gpus": (
        ["--gpus=3", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=300"],
        {"TresPerJob": "gres:gpu:3", "TresPerNode": "gres:gpu:0", "MinMemoryNode": "300M"},
        (),
    ),
    "gpus-per-node": (
        ["--gpus-per-node=2", "--cpus-per-task=2", "--mem-per-cpu=150"],
        {"TresPerJob": None, "TresPerNode": "gres:gpu:2", "CPUs/Task": "2", "MinMemoryCPU": "150M"},
        (),
    ),
    "gpus-per-task": (
        ["--gpus-per-task=1", "--gpus-per-node=0", "--ntasks=2", "--cpus-per-task=1", "--mem-per-gpu=200"],
        {"TresPerTask": "gres:gpu:1", "TresPerNode": "gres:gpu:0", "NumTasks": "2", "MemPerTres": "gres:gpu:200"},
        (),
    ),
    # Both recorded, as on a GPU cluster where `sbatch --gpus=16 slurm/continual.sh` keeps the
    # script's --gpus-per-node=8.
    "gpus beside the script's gpus-per-node": (
        ["--gpus=4", "--gpus-per-node=2", "--cpus-per-task=1"],
        {"TresPerJob": "gres:gpu:4", "TresPerNode": "gres:gpu:2"},
        (),
    ),
    # --gres adds to the script's --gpus-per-node: TresPerNode lists both, --gpus-per-node first.
    "gres": (
        ["--gres=gpu:1", "--gpus-per-node=0", "--cpus-per-task=1"],
        {"TresPerNode": "gres:gpu:0,gres:gpu:1"},
        (),
    ),
    # SLURM refuses --cpus-per-gpu beside --cpus-per-task: a copy of the script without that line.
    "cpus-per-gpu": (
        ["--gpus-per-node=1", "--cpus-per-gpu=2"],
        {"TresPerNode": "gres:gpu:1", "CpusPerTres": "gres:gpu:2"},
        ("--cpus-per-task",),
    ),
    "gpus-per-socket": (
        ["--gpus-per-socket=1", "--sockets-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"],
        {"TresPerSocket": "gres:gpu:1", "Socks/Node": "1"},
        (),
    ),
}


@pytest.fixture(scope="module")
def reservation(slurm: LocalSlurm):
    """A reservation of both nodes for root (IGNORE_JOBS: whatever runs now may go on)."""
    slurm.command(
        [
            "scontrol",
            "create",
            "reservation",
            f"ReservationName={RESERVATION}",
            "Users=root",
            "StartTime=now",
            "Duration=30",
            "Nodes=ALL",
            "Flags=IGNORE_JOBS",
        ]
    )
    yield RESERVATION
    slurm.command(["scontrol", "delete", f"ReservationName={RESERVATION}"])


def batch_script(path: Path, leave_out: tuple[str, ...]) -> Path:
    """slurm/continual.sh's #SBATCH lines (but `leave_out`), then BODY."""
    sbatch_lines = [
        line
        for line in SCRIPT.read_text().splitlines()
        if line.startswith("#SBATCH") and not any(line.split()[1].startswith(opt) for opt in leave_out)
    ]
    assert any("--gpus-per-node=" in line for line in sbatch_lines), "the script no longer has a GPU default"
    path.write_text("\n".join(["#!/bin/bash", *sbatch_lines, BODY]))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_the_next_job_asks_for_what_this_job_had(slurm, reservation, tmp_path, case):
    options, expected, leave_out = CASES[case]
    script = batch_script(tmp_path / "job.sh", leave_out)
    env = {"PESO_PYTHON": sys.executable, "PYTHONPATH": str(REPO), "PESO_ALLOW_CPU": "1"}
    first = slurm.sbatch([*COMMON, *options, str(script)], env=env, cwd=tmp_path)
    next_id = tmp_path / "next.id"
    if not wait_until(next_id.exists, 30):
        pytest.fail(f"job {first} wrote no next.id\n{slurm.describe(first)}")
    nxt = int(next_id.read_text())

    before = slurm.job_info(first)
    after = slurm.job_info(nxt)
    assert before["JobState"] == "RUNNING" and after["JobState"] == "PENDING", slurm.describe(nxt, after)
    assert after["Dependency"].startswith(f"afterok:{first}")
    request = slurm.request(first, before)
    # What the first job asked for is really in its record (else the comparison proves nothing).
    assert {key: request[key] for key in expected} == expected
    assert request["Account"] == "peso-acct" and request["Reservation"] == reservation
    assert request["Features"] == "loopback&fakegpu"
    assert slurm.request(nxt, after) == request
    assert after["Command"] == str(script) and os.path.exists(after["StdOut"])
