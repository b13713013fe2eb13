"""Helpers for tests that run real multi-process DeepSpeed on the CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data_tools.convert import convert_blocks
from launcher.periods import local_command

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAIN = os.path.join(REPO, "train", "main.py")
PROBE = os.path.join(REPO, "tests", "dist", "probe_export.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/dist/" in str(item.fspath):
            item.add_marker(pytest.mark.dist)


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    e.pop("RANK", None)
    return e


def train(nproc: int, args: list[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run train/main.py on `nproc` CPU ranks; on failure, show its output."""
    proc = subprocess.run(
        local_command(nproc, args, MAIN), env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def launcher(*args) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args], env=env(), capture_output=True, text=True, timeout=300, cwd=REPO
    )


def probe_export(export: str, data: str, window: int, max_users: int, tmp_path, device: str = "cpu") -> dict:
    """What tests/dist/probe_export.py finds, in a fresh process without DeepSpeed, when the
    export scores a window's test users (its doc says what the result holds)."""
    out = str(tmp_path / "probe.json")
    args = [export, data, str(window), str(max_users), out, device]
    proc = subprocess.run(
        [sys.executable, PROBE, *args], env=env(), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def kill_all_with(marker: str) -> int:
    """SIGKILL every process whose command line contains `marker` (torchrun's workers live in
    process groups of their own, so killing the launcher's group would orphan them)."""
    import signal

    killed = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
                    killed += 1
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return killed


@pytest.fixture(scope="session")
def ds_configs(tmp_path_factory) -> dict:
    """ZeRO-2 and ZeRO-3 configs; ZeRO-3 with stage3_param_persistence_threshold 0, so that even
    the tiny model's parameters are really partitioned."""
    out = tmp_path_factory.mktemp("ds")
    paths = {}
    for stage in (2, 3):
        with open(os.path.join(REPO, "ds_configs", f"zero{stage}.json")) as f:
            cfg = json.load(f)
        if stage == 3:
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        paths[stage] = str(out / f"zero{stage}.json")
        with open(paths[stage], "w") as f:
            json.dump(cfg, f)
    return paths


@pytest.fixture(scope="session")
def cds_data(tmp_path_factory, cds_blocks) -> str:
    """The paper's CDs blocks with their semantic IDs, as a dataset folder."""
    return convert_blocks(cds_blocks, str(tmp_path_factory.mktemp("cds") / "ds"), log=sys.stdout)


# The paper's objective and prompt (one sample per target, the instruction template), over a
# config of the sequence objective such as configs/tiny.yaml.
RESPONSE = ["data.objective=response", "data.template=null", "data.separator=', '"]

# Small, quick settings for the tiny model on the CDs blocks (overrides of configs/tiny.yaml).
QUICK = [
    "data.micro_batch_size=4",
    "schedule.global_batch_size=8",
    "logging.every_steps=1",
    "logging.progress=false",
    "eval.every_period=false",
    "data.eval_batch_size=64",
]
