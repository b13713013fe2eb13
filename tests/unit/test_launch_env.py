"""The SLURM step's small parsers and the free-port helper (no SLURM needed)."""

from __future__ import annotations

import socket

import pytest

from launcher.slurm import next_job_command, parse_scontrol_line
from train.common.launch_env import free_port, tasks_per_node

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
