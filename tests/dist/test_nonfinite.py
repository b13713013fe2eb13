"""A non-finite loss is skipped and counted; too many in a row stop the run with a clear error."""

from __future__ import annotations

import json
import os

from tests.dist.conftest import QUICK, REPO, train

CONFIG = os.path.join(REPO, "configs", "tiny.yaml")


def test_a_nonfinite_micro_batch_is_skipped_and_counted(tmp_path, cds_data, ds_configs, monkeypatch):
    monkeypatch.setenv("PESO_FAULT_NAN_AT", "3")  # rank 0's loss of micro-batch 3 becomes NaN
    run = str(tmp_path / "run")
    train(
        2,
        [
            "--ds_config",
            ds_configs[3],
            "--config",
            CONFIG,
            "--data",
            cds_data,
            "--run_dir",
            run,
            "schedule.max_steps=6",
            *QUICK,
        ],
    )
    with open(os.path.join(run, "periods", "0", "train_summary.json")) as f:
        summary = json.load(f)
    assert summary["nonfinite_skipped"] == 1 and summary["steps"] == 6


def test_a_diverging_run_stops_with_a_clear_error(tmp_path, cds_data, ds_configs):
    proc = train(
        1,
        [
            "--ds_config",
            ds_configs[2],
            "--config",
            CONFIG,
            "--data",
            cds_data,
            "--run",
            str(tmp_path / "run"),
            "schedule.max_steps=40",
            "optim.lr=1e35",
            "optim.grad_clip=0",
            "optim.max_nonfinite_in_a_row=3",
            "schedule.warmup_ratio=0",
            *QUICK,
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert "micro-batches in a row had a non-finite loss" in proc.stderr
