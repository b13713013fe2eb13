"""The user's path on one GPU (marked `gpu`: skipped where there is no CUDA, e.g. in CI), through
the real entry point, as our users run it: `ds_configs/zero3.json` as shipped (bf16 by `auto`),
period 0 with LoRA, period 1 with peso and item vectors, stopped by SIGUSR1 inside period 1 and
resumed from its checkpoint, evaluated, then exported and evaluated again from the export in a
fresh process on the same GPU.

`PESO_GPU_TESTS_ON_CPU=1` runs the same path on the CPU in bf16 (tests/conftest.py), to check the
test itself on a machine without a GPU; CI does not set it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.dist.conftest import launcher, probe_export

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN = os.path.join(REPO, "train", "main.py")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

pytestmark = pytest.mark.gpu

COMMON = [
    "model.period0=lora",
    "model.item_vectors=16",
    "method.name=peso",
    "method.lam=100",
    "data.objective=response",
    "data.template=null",
    "data.separator=', '",
    "data.micro_batch_size=4",
    "schedule.global_batch_size=8",
    "checkpoint.every_steps=2",
    "logging.every_steps=1",
    "logging.progress=false",
    "eval.max_users=12",
    *([] if CUDA else ["model.dtype=bf16"]),  # what auto gives on a GPU
]


def env(**extra) -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    e.pop("RANK", None)
    return e


def period(run: str, data: str, t: int, *extra: str, **environ) -> subprocess.CompletedProcess:
    args = ["--ds_config", os.path.join(REPO, "ds_configs", "zero3.json"), "--config"]
    args += [os.path.join(REPO, "configs", "tiny.yaml"), "--data", data, "--run", run, "--period", str(t)]
    return subprocess.run(
        [sys.executable, MAIN, *args, *COMMON, *extra],
        env=env(**environ),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


def state(run: str) -> dict:
    with open(os.path.join(run, "state.json")) as f:
        return json.load(f)


def test_the_user_path_on_one_gpu(tmp_path, small_dataset):
    run = str(tmp_path / "run")
    first = period(run, small_dataset, 0, "schedule.max_steps=8")
    assert first.returncode == 0, first.stderr[-4000:]
    with open(os.path.join(run, "periods", "0", "config.json")) as f:
        recorded = json.load(f)
    assert recorded["device"] == DEVICE
    assert recorded["precision"] == {"compute": "bf16", "trainable": ["bfloat16"]}
    assert recorded["ds_config"]["zero_optimization"]["stage"] == 3

    # Period 1: SIGUSR1 before micro-batch 5 (the third optimizer step) -> a checkpoint, exit 75.
    stopped = period(run, small_dataset, 1, PESO_FAULT_SIGNAL_AT="train:5")
    assert stopped.returncode == 75, stopped.stderr[-4000:]
    assert state(run)["phase"] == "stopped" and state(run)["done"] == [0]
    with open(os.path.join(run, "periods", "1", "ds_ckpt", "COMPLETE.json")) as f:
        assert json.load(f)["tag"] == "step-00000003"
    resumed = period(run, small_dataset, 1)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed period 1 at epoch 0, micro-batch 6, step 3" in resumed.stderr + resumed.stdout
    assert state(run)["done"] == [0, 1]

    with open(os.path.join(run, "periods", "1", "metrics.json")) as f:
        metrics = json.load(f)
    assert sorted(metrics["windows"]) == ["0", "1"] and all(
        w["invalid_outputs"] == 0 for w in metrics["windows"].values()
    )
    with open(os.path.join(run, "periods", "1", "recommendations.jsonl")) as f:
        lists = [json.loads(line) for line in f]
    assert lists and all(len(x["items"]) == 20 for x in lists)

    # The export, served without DeepSpeed in a fresh process on the same device, ranks as the run did.
    out = str(tmp_path / "export")
    export = launcher("export", run, "--period", "1", "--out", out)
    assert export.returncode == 0, export.stderr[-3000:]
    result = probe_export(out, small_dataset, 1, 12, tmp_path, DEVICE)
    assert [(x["user"], x["target"]) for x in lists] == [(y["user"], y["target"]) for y in result["lists"]]
    # bf16 on one device, the same weights and decoding: the same lists, scores within bf16 rounding.
    same = sum(x["items"] == y["items"] for x, y in zip(lists, result["lists"]))
    assert same >= len(lists) - 1, (same, len(lists))
    for x, y in zip(lists, result["lists"]):
        assert abs(x["scores"][0] - y["scores"][0]) < 0.05
    overall = metrics["windows"]["1"]["overall"]
    for key in ("hit@10", "ndcg@10"):
        assert result["metrics"][key] == pytest.approx(overall[key], abs=1 / len(lists)), key
