"""Damaged inputs on 2 real ranks (issue 27): the one `error:` line is printed once, not once per
rank, the ranks exit 2 without a traceback and none is left waiting in a collective, whether every
rank finds the damage (before the process group) or one rank alone (its share of the shards,
inside it); and a checkpoint with a file of one rank cut short is skipped, with a warning, for
the one before it. The single-rank cases, through every entry point: tests/unit/test_damaged_inputs.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.dist.conftest import QUICK, REPO, env, train
from tests.unit.test_damaged_inputs import finished_run, one_line, snapshot, truncate
from train.common.exit_codes import EXIT_REQUEUE

CONFIG = os.path.join(REPO, "configs", "tiny.yaml")
SETTINGS = [*QUICK, "model.period0=lora", "schedule.max_steps=2"]


def _args(ds_config: str, data: str, run: str, *extra: str) -> list[str]:
    return ["--ds_config", ds_config, "--config", CONFIG, "--data", data, "--run_dir", run, *SETTINGS, *extra]


@pytest.fixture
def data(small_dataset, tmp_path) -> str:
    out = str(tmp_path / "ds")
    shutil.copytree(small_dataset, out)
    return out


def test_a_truncated_training_shard_is_one_line_from_launcher_run_on_two_ranks(data, tmp_path, ds_configs):
    shard = os.path.join(data, "windows", "00", "train-000000.tar")
    truncate(shard)
    run = str(tmp_path / "run")
    args = ["-m", "launcher", "run", "--nproc", "2", "--ds_config", ds_configs[2], "--config", CONFIG]
    proc = subprocess.run(
        [sys.executable, *args, "--data", data, "--run", run, *SETTINGS],
        env=env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    one_line(proc, shard, "truncated", "--force")
    assert not os.path.exists(os.path.join(run, "state.json"))


def test_a_shard_damaged_in_one_ranks_share_is_one_line_from_rank_0(data, tmp_path, ds_configs):
    """The size is right, the bytes are not: only the rank that reads the shard against the
    manifest's sha256 (rank 1: window 0's shards are train, valid, test, read by ranks 0, 1, 0)
    finds it; the ranks agree, rank 0 prints the line once, both exit 2."""
    shard = os.path.join(data, "windows", "00", "valid-000000.tar")
    with open(shard, "r+b") as f:
        at = f.read().index(b'"target"')
        f.seek(at + 1)
        f.write(b"TARGET")
    run = str(tmp_path / "run")
    proc = train(2, _args(ds_configs[2], data, run), check=False)
    one_line(proc, shard, "sha256")
    assert "[rank1]" not in proc.stderr and not os.path.exists(os.path.join(run, "state.json"))


def test_a_finished_periods_deleted_adapter_is_one_line_on_two_ranks(data, tmp_path, ds_configs):
    run = finished_run(tmp_path, data)
    shutil.rmtree(os.path.join(run, "periods", "0", "adapter"))
    before = snapshot(run)
    proc = train(2, _args(ds_configs[2], data, run), check=False)
    one_line(proc, "period 0's adapter", "is missing", "new run folder")
    assert snapshot(run) == before


def test_a_checkpoint_with_a_file_of_rank_1_cut_short_is_skipped_for_the_one_before(data, tmp_path, ds_configs):
    """Period 0 stops on a signal after its checkpoints (every step, two kept); rank 1's optimizer
    state of the newest is cut short; the rerun warns, resumes from the one before, and finishes."""
    run = str(tmp_path / "run")
    args = _args(ds_configs[2], data, run, "schedule.max_steps=8", "checkpoint.every_steps=1", "checkpoint.keep=2")
    stopped = subprocess.run(
        [sys.executable, "-m", "launcher.torchrun", "--standalone", "--nproc_per_node=2", "train/main.py", *args],
        env=dict(env(), PESO_FAULT_SIGNAL_AT="train:4"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stopped.returncode == EXIT_REQUEUE, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    folder = os.path.join(run, "periods", "0", "ds_ckpt")
    with open(os.path.join(folder, "COMPLETE.json")) as f:
        newest = json.load(f)["tag"]
    older = sorted(d for d in os.listdir(folder) if d.startswith("step-") and d != newest)[-1]
    victim = next(n for n in os.listdir(os.path.join(folder, newest)) if n.startswith("zero_pp_rank_1_"))
    truncate(os.path.join(folder, newest, victim))
    resumed = train(2, args)
    out = resumed.stdout + resumed.stderr
    assert f"checkpoint {newest} in {folder} is damaged" in out and f"resuming from {older}" in out, out[-3000:]
    with open(os.path.join(folder, f"COMPLETE-{older}.json")) as f:
        step = json.load(f)["client_state"]["micro"]
    assert f"micro-batch {step}," in out, out[-3000:]
    with open(os.path.join(run, "state.json")) as f:
        assert json.load(f)["done"] == [0]
