"""Installing SLURM and munge from Debian packages where their commands are missing."""

from __future__ import annotations

import os
import re

from .shell import SlurmError, SlurmUnavailable, run, say, which

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
COMMANDS = ["slurmctld", "slurmd", "sbatch", "munged"]


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if which(c) is None]


def ensure_installed() -> None:
    """Install SLURM and munge from Debian packages if their commands are missing.

    Raises SlurmUnavailable if this is impossible here: not root (the cluster needs root in
    any case: slurmd runs jobs as root, munged is started as user munge), or no apt-get.
    """
    missing = missing_commands()
    how = f"apt-get install --no-install-recommends {' '.join(PACKAGES)}"
    if os.geteuid() != 0:
        also = f"; SLURM is not installed either (missing: {', '.join(missing)}): {how}" if missing else ""
        raise SlurmUnavailable(
            f"the local SLURM cluster needs root (it starts slurmd, which runs jobs, and munged as user munge){also}"
        )
    if not missing:
        return
    if which("apt-get") is None:
        raise SlurmUnavailable(
            f"SLURM is not installed (missing: {', '.join(missing)}) and there is no "
            f"apt-get; install SLURM (slurmctld, slurmd, client commands) and munge"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for another apt (e.g. unattended upgrades on a fresh CI machine) instead of failing.
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=120"]
    install = apt + ["install", "-y", "--no-install-recommends", *PACKAGES]
    updated = False
    if not _apt_knows_packages():
        say("apt-get update (no package lists for SLURM yet)")
        run(apt + ["update"], timeout=300, env=env)
        updated = True
    say(f"missing {', '.join(missing)}: {' '.join(install)}")
    try:
        run(install, timeout=600, env=env)
    except SlurmError as e:
        if updated:
            raise
        # Old package lists on a machine image name versions the mirror no longer has.
        say(f"{e}\n[local-slurm] apt-get update, then install again")
        run(apt + ["update"], timeout=300, env=env)
        run(install, timeout=600, env=env)
    missing = missing_commands()
    if missing:
        raise SlurmError(f"installed {' '.join(PACKAGES)} but still missing: {', '.join(missing)}")


def _apt_knows_packages() -> bool:
    out = run(["apt-cache", "policy", *PACKAGES], check=False).stdout
    candidates = re.findall(r"^\s+Candidate: (.+)$", out, flags=re.M)
    return len(candidates) == len(PACKAGES) and "(none)" not in candidates
