"""Configuration errors are clear, name the key, and come before any process trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from train.config import ConfigError, accumulation_steps, load_config
from train.ds_config import fill_ds_config, load_ds_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def test_tiny_config_loads_and_overrides_apply():
    cfg = load_config(TINY, ["optim.lr=1e-4", "schedule.epochs=3", "lora.targets=[q_proj, v_proj]", "model.dtype=fp32"])
    assert cfg.optim.lr == 1e-4 and cfg.schedule.epochs == 3 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.model.shape == "tiny" and cfg.model.period0 == "full"


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=1"], "unknown key optim.lrr"),
    (["optimizer.lr=1"], "unknown section 'optimizer'"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["schedule.epochs=1.5"], "schedule.epochs: expected an integer"),
    (["model.period0=half"], "model.period0 must be lora or full"),
    (["method.name=ewc"], "method.name must be"),
    (["lora.targets=[qkv]"], "lora.targets: unknown projections"),
    (["model.path=/somewhere"], "set exactly one of model.path"),
    (["eval.beams=3"], "eval.beams (3) must be >= the largest K"),
    (["optim.lr"], "is not of the form section.key=value"),
])
def test_config_errors_name_the_problem(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert message in str(e.value)


def test_impossible_batch_arithmetic():
    cfg = load_config(TINY, ["schedule.global_batch_size=30", "data.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"global_batch_size \(30\) must be a multiple of .* \(4\) x ranks \(2\) = 8"):
        accumulation_steps(cfg, 2)
    assert accumulation_steps(load_config(TINY, ["schedule.global_batch_size=32", "data.micro_batch_size=4"]), 2) == 4


def test_ds_config_autos_are_filled_and_leftovers_are_errors(tmp_path):
    cfg = load_config(TINY, ["schedule.global_batch_size=32", "data.micro_batch_size=4"])
    ds = fill_ds_config(load_ds_config(os.path.join(REPO, "ds_configs", "zero3.json")), cfg, 2, 64, "fp32", 3e-4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 4, 32)
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    off = fill_ds_config(load_ds_config(os.path.join(REPO, "ds_configs", "zero3_offload.json")), cfg, 2, 64, "bf16", 3e-4)
    assert off["optimizer"]["params"]["lr"] == 3e-4 and off["bf16"]["enabled"] is True
    bad = load_ds_config(os.path.join(REPO, "ds_configs", "zero2.json"))
    bad["zero_optimization"]["mystery"] = "auto"
    with pytest.raises(ConfigError, match="zero_optimization.mystery"):
        fill_ds_config(bad, cfg, 2, 64, "fp32", 1e-3)
    bad = load_ds_config(os.path.join(REPO, "ds_configs", "zero2.json"))
    bad["train_batch_size"] = 64
    with pytest.raises(ConfigError, match="train_batch_size=64, the experiment needs 32"):
        fill_ds_config(bad, cfg, 2, 64, "fp32", 1e-3)


def _main(args, env=None):
    e = dict(os.environ, **(env or {}))
    e.pop("RANK", None)
    return subprocess.run([sys.executable, os.path.join(REPO, "train", "main.py"), *args], capture_output=True, text=True,
                          env=e, timeout=120)


def test_main_reports_errors_before_training(tmp_path, ml_indexed):
    ds = os.path.join(REPO, "ds_configs", "zero2.json")
    base = ["--ds_config", ds, "--config", TINY, "--run", str(tmp_path / "run")]
    cases = [
        (base + ["--data", str(tmp_path / "nope")], None, "does not exist"),
        (base + ["--data", ml_indexed, "--period", "5"], None, "period 5 is beyond the dataset's last window (5 windows: 0..4)"),
        (base + ["--data", ml_indexed, "optim.nope=1"], None, "unknown key optim.nope"),
        (base + ["--data", ml_indexed, "schedule.global_batch_size=12", "data.micro_batch_size=4"], {"WORLD_SIZE": "2"},
         "must be a multiple of"),
        (base + ["--data", ml_indexed, "--period", "1"], None, "needs period 0's model"),
    ]
    for args, env, message in cases:
        proc = _main(args, env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_main_requires_an_item_index(tmp_path, ml_indexed):
    """A dataset without item_index.json: a clear error saying how to build one."""
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(ml_indexed, data, ignore=shutil.ignore_patterns("item_index*"))
    proc = _main(["--ds_config", os.path.join(REPO, "ds_configs", "zero2.json"), "--config", TINY, "--data", data,
                  "--run", str(tmp_path / "run")])
    assert proc.returncode == 2
    assert "python -m data_tools index" in proc.stderr
    with open(os.path.join(data, "manifest.json")) as f:
        assert json.load(f)["windows"]
