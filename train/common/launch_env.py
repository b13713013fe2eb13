"""What starting the ranks needs, without torch (the launcher imports it): a free TCP port for
MASTER_PORT, and how many tasks SLURM runs on a node."""

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
