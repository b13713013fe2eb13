"""Evaluation stopped by a signal and resumed, and evaluation with a replica, on 2 ranks under
really partitioned ZeRO-3: a LoRA period with peso (pulled toward period 0's adapter) and item
vectors, on a small stream of two windows, so period 1 evaluates windows 0 and 1.

- `python -m launcher run` trains periods 0 and 1; a stop request arrives during period 1's
  evaluation (PESO_FAULT_SIGNAL_AT=eval:1:0: rank 0 sends itself SIGUSR1 before window 1's first
  batch, after window 0 is finished): exit 75, state.json "stopped", window 0's result kept.
  The same command again evaluates window 1 only and writes what an uninterrupted evaluation
  (`--eval_only`, from scratch) writes.
- The same period evaluated with a replica per rank (eval.replica=always) gives the sharded
  engine's metrics.json (never): the same hits and NDCG, the test loss within float noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import small_stream
from tests.dist.conftest import QUICK, REPO, env, train
from train.common.exit_codes import EXIT_REQUEUE

CONFIG = os.path.join(REPO, "configs", "tiny.yaml")
SETTINGS = [
    *QUICK,
    "model.period0=lora",
    "model.item_vectors=8",
    "method.name=peso",
    "schedule.max_steps=2",
    "eval.every_period=true",
    "data.eval_batch_size=4",  # several batches per rank and window
    "eval.replica=never",  # the sharded engine: a stop between batches of collective forwards
]


@pytest.fixture(scope="module")
def two_windows(tmp_path_factory) -> str:
    """30 users x 40 interactions over 60 items, cut into window 0 (60%) and window 1, random codes."""
    return small_stream(tmp_path_factory.mktemp("two-windows"), seed=5, split="paper:0.6:1")


def launcher_run(data: str, run: str, ds_config: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "launcher", "run", "--config", CONFIG, "--data", data, "--run", run]
    command += ["--ds_config", ds_config, "--nproc", "2", *SETTINGS]
    return subprocess.run(command, env=env() | (extra_env or {}), capture_output=True, text=True, timeout=400, cwd=REPO)


def outputs(run: str) -> tuple[dict, str]:
    folder = os.path.join(run, "periods", "1")
    with open(os.path.join(folder, "metrics.json")) as f, open(os.path.join(folder, "recommendations.jsonl")) as g:
        return json.load(f), g.read()


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory, two_windows, ds_configs) -> dict:
    """The stopped run, its rerun, then period 1 evaluated again from scratch with the sharded
    engine and with a replica."""
    run = str(tmp_path_factory.mktemp("eval-stop") / "run")
    out = {"run": run}
    out["stopped"] = launcher_run(two_windows, run, ds_configs[3], {"PESO_FAULT_SIGNAL_AT": "eval:1:0"})
    with open(os.path.join(run, "state.json")) as f:
        out["state"] = json.load(f)
    out["eval_files"] = sorted(os.listdir(os.path.join(run, "periods", "1", "eval")))
    out["resumed"] = launcher_run(two_windows, run, ds_configs[3])
    out["resumed_outputs"] = outputs(run)
    out["eval_left"] = os.path.exists(os.path.join(run, "periods", "1", "eval"))
    flags = ["--ds_config", ds_configs[3], "--config", CONFIG, "--data", two_windows, "--run_dir", run]
    for mode in ("never", "always"):
        out[mode] = train(2, [*flags, "--period", "1", "--eval_only", *SETTINGS, f"eval.replica={mode}"])
        out[f"{mode}_outputs"] = outputs(run)
    return out


def test_a_stop_during_evaluation_exits_75_and_the_rerun_skips_finished_windows(evaluations):
    stopped, resumed = evaluations["stopped"], evaluations["resumed"]
    assert stopped.returncode == EXIT_REQUEUE, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert evaluations["state"]["phase"] == "stopped" and evaluations["state"]["done"] == [0]
    assert evaluations["eval_files"] == ["window-0.json"]  # window 0 finished before the stop
    assert "period 1: evaluating window 0" in stopped.stdout and "period 1: evaluating window 1" in stopped.stdout
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "period 1: window 0 was evaluated before a stop; its result is reused" in resumed.stdout
    assert "evaluating window 0" not in resumed.stdout and "period 1: evaluating window 1" in resumed.stdout
    with open(os.path.join(evaluations["run"], "state.json")) as f:
        assert json.load(f)["done"] == [0, 1]
    assert not evaluations["eval_left"]  # the window files go once metrics.json is written
    # --eval_only evaluates from scratch (nothing reused), with the same engine: the same bytes.
    assert "reused" not in evaluations["never"].stdout
    metrics, recommendations = evaluations["resumed_outputs"]
    assert evaluations["never_outputs"] == (metrics, recommendations)
    assert (
        set(metrics["windows"]) == {"0", "1"} and len(recommendations.splitlines()) == metrics["windows"]["1"]["users"]
    )


def test_a_replica_gives_the_sharded_engines_metrics(evaluations):
    assert "the replica is built" in evaluations["always"].stdout
    assert "the replica is built" not in evaluations["never"].stdout
    (sharded, sharded_lists), (replica, replica_lists) = evaluations["never_outputs"], evaluations["always_outputs"]
    for j, window in sharded["windows"].items():
        other = replica["windows"][j]
        assert other["overall"].pop("test_loss") == pytest.approx(window["overall"].pop("test_loss"), rel=1e-6)
        assert other == window, j
    for x, y in zip(map(json.loads, sharded_lists.splitlines()), map(json.loads, replica_lists.splitlines())):
        assert (x["user"], x["rank"], x["items"]) == (y["user"], y["rank"], y["items"])
        assert max(abs(a - b) for a, b in zip(x["scores"], y["scores"])) < 1e-5
