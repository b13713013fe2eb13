"""What an operator sees on one real rank: `python -m launcher run` stopped by a signal exits 75,
and a period resumes only with the config it started with (or restarts with --restart-period).
That a change of the keys that may change still resumes, and exactly, is in test_engine.py
(the SIGKILL test resumes with other checkpoint and evaluation settings)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.dist.conftest import QUICK, REPO, env, train
from train.common.exit_codes import EXIT_REQUEUE

CONFIG = os.path.join(REPO, "configs", "tiny.yaml")
# A period long enough to be stopped in (12 steps), checkpointed every 2 steps.
SETTINGS = [*QUICK, "schedule.max_steps=12", "checkpoint.every_steps=2"]


def _period0_args(ds_config: str, data: str, run: str, *extra: str) -> list[str]:
    """What `launcher run` gives train/main.py for period 0, plus `extra`."""
    return [
        "--ds_config",
        ds_config,
        "--config",
        CONFIG,
        "--data",
        data,
        "--run_dir",
        run,
        "--period",
        "0",
        *SETTINGS,
        *extra,
    ]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, small_dataset, ds_configs):
    """A `python -m launcher run` sent SIGTERM once period 0 has its first checkpoint: its exit
    code and stderr, and the run folder it left."""
    run = str(tmp_path_factory.mktemp("stopped") / "run")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher",
            "run",
            "--config",
            CONFIG,
            "--data",
            small_dataset,
            "--run",
            run,
            "--ds_config",
            ds_configs[2],
            *SETTINGS,
        ],
        env=env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    complete = os.path.join(run, "periods", "0", "ds_ckpt", "COMPLETE.json")
    deadline = time.time() + 240
    while not os.path.exists(complete):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"period 0 ended or hung before its first checkpoint:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    return {"code": proc.returncode, "stderr": stderr, "run": run, "data": small_dataset, "ds": ds_configs[2]}


def test_launcher_run_stopped_by_a_signal_checkpoints_and_exits_75(stopped):
    assert stopped["code"] == EXIT_REQUEUE, stopped["stderr"][-3000:]
    assert "period 0 stopped on a signal after a checkpoint; rerun the same command to resume it" in stopped["stderr"]
    with open(os.path.join(stopped["run"], "state.json")) as f:
        assert json.load(f) | {"global_step": 0} == {"done": [], "global_step": 0, "period": 0, "phase": "stopped"}
    assert not os.path.exists(os.path.join(stopped["run"], "periods", "0", "train_summary.json"))


def _copy(stopped, tmp_path) -> str:
    run = str(tmp_path / "run")
    shutil.copytree(stopped["run"], run)
    return run


def test_resuming_with_a_changed_config_is_an_error_naming_the_keys(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    proc = train(
        1, _period0_args(stopped["ds"], stopped["data"], run, "optim.lr=1e-3", "schedule.max_steps=30"), check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "period 0 would resume from its checkpoint" in proc.stderr
    assert "optim.lr: 0.003 -> 0.001" in proc.stderr and "schedule.max_steps: 12 -> 30" in proc.stderr
    assert "--restart-period" in proc.stderr and "Traceback" not in proc.stderr


def test_restart_period_discards_the_checkpoints_and_trains_with_the_new_config(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    proc = train(
        1,
        _period0_args(stopped["ds"], stopped["data"], run, "optim.lr=1e-3", "schedule.max_steps=4", "--restart-period"),
    )
    assert "period 0: --restart-period: its checkpoints are discarded" in proc.stdout
    assert "resumed period 0" not in proc.stdout
    with open(os.path.join(run, "periods", "0", "train_summary.json")) as f:
        assert json.load(f)["steps"] == 4
    with open(os.path.join(run, "periods", "0", "config.json")) as f:
        assert json.load(f)["config"]["optim"]["lr"] == 1e-3
