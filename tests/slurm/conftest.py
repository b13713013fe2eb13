"""The real local SLURM cluster for tests/slurm (see cluster.py): stood up once per session.

Every test in this folder gets the `slurm` marker (`-m "not slurm"` leaves them out). Where SLURM
cannot be installed (not root, no apt-get) they are skipped with the reason, unless
PESO_REQUIRE_SLURM=1 (then they error): CI on this project's machines must really run them.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from .cluster import LocalSlurm, SlurmUnavailable

HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def slurm():
    """The running LocalSlurm; torn down at the end of the session, also after failures.

    A cluster that a developer started by hand (`python -m tests.slurm.cluster start`) and that
    is up with the same config is used as it is and left running.
    """
    cluster = LocalSlurm()
    try:
        cluster.ensure_installed()
    except SlurmUnavailable as e:
        # `make test` as root (CI) sets PESO_REQUIRE_SLURM=1 and installs the packages, so
        # there a missing cluster fails. Elsewhere (a developer without root, who cannot
        # install slurmctld) the SLURM tests are skipped with the reason, not failed.
        if os.environ.get("PESO_REQUIRE_SLURM") == "1":
            raise
        pytest.skip(str(e))
    started = cluster.start()  # on failure it cleans up after itself and raises with the logs
    keep = not started and cluster.started_by_hand
    # A CI timeout sends SIGTERM, which would end pytest without any teardown: make it a Ctrl-C,
    # after which pytest tears down (this fixture too) as usual.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield cluster
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not keep:
            cluster.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@pytest.fixture(autouse=True)
def _empty_queue(slurm):
    """Each test starts and ends with no job queued or running (a failed test leaves none behind)."""
    slurm.cancel_all()
    yield
    slurm.cancel_all()
