"""GPU checks (marked `gpu`: skipped where there is no CUDA, e.g. in CI): bf16 training of one
period through the real entry point, and the full model on the GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.gpu


def test_one_period_in_bf16_on_the_gpu(tmp_path, ml_indexed):
    run = str(tmp_path / "run")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("RANK", None)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "train", "main.py"),
            "--ds_config",
            os.path.join(REPO, "ds_configs", "zero2.json"),
            "--config",
            os.path.join(REPO, "configs", "tiny.yaml"),
            "--data",
            ml_indexed,
            "--run",
            run,
            "schedule.max_steps=20",
            "eval.max_users=32",
            "logging.progress=false",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(run, "periods", "0", "config.json")) as f:
        assert json.load(f)["ds_config"]["bf16"]["enabled"] is torch.cuda.is_bf16_supported()
    with open(os.path.join(run, "periods", "0", "metrics.json")) as f:
        assert json.load(f)["windows"]["0"]["invalid_outputs"] == 0
