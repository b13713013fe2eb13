"""What starting the ranks needs, without torch (the launcher imports it): a free TCP port for
MASTER_PORT, how many tasks SLURM runs on a node, and a process's rank and world before any
process group."""

from __future__ import annotations

import os
import re
import socket


def free_port(host: str = "", port: int = 0, *, reuse_address: bool = False) -> int:
    """A TCP port on `host` that nothing is bound to: `port` itself (OSError if it is taken), or
    with 0 one that the system picks. `reuse_address` binds as servers do (SO_REUSEADDR), so a
    port that only lingers in TIME_WAIT counts as free."""
    with socket.socket() as s:
        if reuse_address:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return s.getsockname()[1]


def tasks_per_node(environ=os.environ) -> int:
    """The tasks (ranks) SLURM runs on a node: SLURM_NTASKS_PER_NODE when the job asked for it,
    else the first count of SLURM_TASKS_PER_NODE ("2(x3),1" -> 2)."""
    raw = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "1")
    return int(re.match(r"\d+", raw).group())


def under_srun(environ=os.environ) -> bool:
    """Whether this process is one task of `srun`, launched as a rank (one task per rank, as
    slurm/continual.sh does: SLURM gives the rank, the launcher exported MASTER_ADDR before srun),
    rather than torchrun's or the deepspeed launcher's (they set RANK)."""
    return "RANK" not in environ and "SLURM_PROCID" in environ and "MASTER_ADDR" in environ


def launch_rank_and_world(environ=os.environ) -> tuple[int, int]:
    """This process's rank and the number of ranks, read from the launcher's environment before
    any process group exists (as DeepSpeedStrategy will see them): RANK and WORLD_SIZE (torchrun,
    the deepspeed launcher; either alone counts), SLURM_PROCID and SLURM_NTASKS under srun, else a
    world of one."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return int(environ.get("RANK") or 0), int(environ.get("WORLD_SIZE") or 1)
    if under_srun(environ):
        return int(environ["SLURM_PROCID"]), int(environ.get("SLURM_NTASKS") or 1)
    return 0, 1
