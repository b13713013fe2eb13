"""The SLURM step's small parsers and the free-port helper (no SLURM needed)."""

from __future__ import annotations

import socket

import pytest

from launcher.slurm import next_job_command, parse_scontrol_line
from train.common.launch_env import free_port, launch_rank_and_world, tasks_per_node

JOB_LINE = (
    "JobId=42 JobName=cds study UserId=root(0) JobState=RUNNING Reason=None "
    "Command=/runs/my run/continual.sh --period 2 WorkDir=/runs/my run NumNodes=2 NumTasks=4 "
    "CPUs/Task=1 NtasksPerN:B:S:C=2:0:*:* TresPerNode=gres:gpu:1 TimeLimit=01:00:00 "
    "TRES=cpu=4,mem=8G,node=2 Partition=debug StdOut=/runs/my run/slurm-42.out StdErr=/runs/my run/slurm-42.out"
)


def test_scontrol_values_keep_their_spaces():
    fields = parse_scontrol_line(JOB_LINE)
    assert fields["JobName"] == "cds study"
    assert fields["Command"] == "/runs/my run/continual.sh --period 2"
    assert fields["WorkDir"] == "/runs/my run"
    assert fields["StdOut"] == "/runs/my run/slurm-42.out"
    assert fields["UserId"] == "root(0)"
    assert fields["TRES"] == "cpu=4,mem=8G,node=2"  # a value's own `=` starts no field
    assert fields["CPUs/Task"] == "1" and fields["NtasksPerN:B:S:C"] == "2:0:*:*"


def test_next_job_keeps_a_command_and_output_with_spaces():
    fields = parse_scontrol_line(JOB_LINE)
    cmd = next_job_command(fields, fields["Command"])
    assert "--job-name=cds study" in cmd
    assert "--output=/runs/my run/slurm-42.out" in cmd
    assert "--ntasks-per-node=2" in cmd and "--gpus-per-node=1" in cmd and "--nodes=2" in cmd
    assert cmd[-1] == "/runs/my run/continual.sh --period 2"


@pytest.mark.parametrize(
    "environ, tasks",
    [
        ({}, 1),
        ({"SLURM_TASKS_PER_NODE": "2(x3)"}, 2),
        ({"SLURM_TASKS_PER_NODE": "3,1"}, 3),
        ({"SLURM_TASKS_PER_NODE": "2(x3)", "SLURM_NTASKS_PER_NODE": "4"}, 4),
    ],
)
def test_tasks_per_node(environ, tasks):
    assert tasks_per_node(environ) == tasks


def test_free_port_is_free_and_a_taken_one_is_refused():
    port = free_port("127.0.0.1")
    assert free_port("127.0.0.1", port) == port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError):
            free_port("127.0.0.1", s.getsockname()[1], reuse_address=True)


@pytest.mark.parametrize(
    "environ, rank_and_world",
    [
        ({}, (0, 1)),
        ({"RANK": "3", "WORLD_SIZE": "4"}, (3, 4)),  # torchrun, the deepspeed launcher
        ({"WORLD_SIZE": "2"}, (0, 2)),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "8", "MASTER_ADDR": "node1"}, (1, 8)),  # srun, one task per rank
        # a plain process inside an sbatch job (no srun): one process, whatever the job's task count
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, (0, 1)),
        # torchrun inside an srun task: torchrun's ranks, not SLURM's
        ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "MASTER_ADDR": "x"}, (1, 2)),
    ],
)
def test_rank_and_world_before_the_process_group(environ, rank_and_world):
    assert launch_rank_and_world(environ) == rank_and_world
