"""Configuration errors are clear, name the key, and come before any process trains."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from train.common.config import ConfigError, accumulation_steps, describe, load_config, resume_conflicts
from train.dist.ds_config import fill_ds_config, load_ds_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def test_tiny_config_loads_and_overrides_apply():
    cfg = load_config(TINY, ["optim.lr=1e-4", "schedule.epochs=3", "lora.targets=[q_proj, v_proj]", "model.dtype=fp32"])
    assert cfg.optim.lr == 1e-4 and cfg.schedule.epochs == 3 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.model.shape == "tiny" and cfg.model.period0 == "full"


@pytest.mark.parametrize(
    "overrides,message",
    [
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
        (["eval.ks=[]"], "eval.ks: expected a non-empty list, got []"),
        (["eval.ks=5"], "eval.ks: expected a non-empty list, got 5"),
        (["eval.ks=[5, a]"], "eval.ks[1]: expected an integer, got 'a'"),
        (["eval.ks=[0, 5]"], "eval.ks must be positive integers, got [0, 5]"),
        (["lora.targets=[q_proj, 7]"], "lora.targets[1]: expected a string, got 7"),
        (["lora.targets=[]"], "lora.targets: expected a non-empty list"),
        (["optim.betas=[0.9, x]"], "optim.betas[1]: expected a number, got 'x'"),
        (["optim.betas=[0.9]"], "optim.betas must be two numbers in [0, 1), got [0.9]"),
        (["method.name=peso", "method.pull=rows"], "method.pull must be lora or all, not 'rows'"),
        (["method.name=single", "method.pull=all"], "method single has none (methods with one: peso, l2)"),
    ],
)
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
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        4,
        4,
        32,
    )
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == 1.0
    zero = ds["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 640 and zero["zero_hpz_partition_size"] == 1
    # A LoRA period keeps its LoRA factors whole (persistent); several nodes partition a second copy per node.
    lora = fill_ds_config(
        load_ds_config(os.path.join(REPO, "ds_configs", "zero3.json")),
        load_config(TINY, ["schedule.global_batch_size=64", "data.micro_batch_size=4"]),
        16,
        64,
        "bf16",
        3e-4,
        lora_matrix=8 * 172,
        ranks_per_node=8,
    )["zero_optimization"]
    assert lora["stage3_param_persistence_threshold"] == 8 * 172 and lora["zero_hpz_partition_size"] == 8
    off = fill_ds_config(
        load_ds_config(os.path.join(REPO, "ds_configs", "zero3_offload.json")), cfg, 2, 64, "bf16", 3e-4
    )
    assert off["optimizer"]["params"]["lr"] == 3e-4 and off["bf16"]["enabled"] is True
    bad = load_ds_config(os.path.join(REPO, "ds_configs", "zero2.json"))
    bad["zero_optimization"]["mystery"] = "auto"
    with pytest.raises(ConfigError, match=r"zero_optimization\.mystery"):
        fill_ds_config(bad, cfg, 2, 64, "fp32", 1e-3)
    bad = load_ds_config(os.path.join(REPO, "ds_configs", "zero2.json"))
    bad["train_batch_size"] = 64
    with pytest.raises(ConfigError, match="train_batch_size=64, the experiment needs 32"):
        fill_ds_config(bad, cfg, 2, 64, "fp32", 1e-3)


def _main(args, env=None):
    e = dict(os.environ, **(env or {}))
    e.pop("RANK", None)
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "train", "main.py"), *args],
        capture_output=True,
        text=True,
        env=e,
        timeout=120,
    )


def test_main_reports_errors_before_training(tmp_path, ml_indexed):
    ds = os.path.join(REPO, "ds_configs", "zero2.json")
    base = ["--ds_config", ds, "--config", TINY, "--run", str(tmp_path / "run")]
    cases = [
        (base + ["--data", str(tmp_path / "nope")], None, "does not exist"),
        (
            base + ["--data", ml_indexed, "--period", "5"],
            None,
            "period 5 is beyond the dataset's last window (5 windows: 0..4)",
        ),
        (base + ["--data", ml_indexed, "optim.nope=1"], None, "unknown key optim.nope"),
        (
            base + ["--data", ml_indexed, "schedule.global_batch_size=12", "data.micro_batch_size=4"],
            {"WORLD_SIZE": "2"},
            "must be a multiple of",
        ),
        (base + ["--data", ml_indexed, "--period", "1"], None, "needs period 0's model"),
        (
            base + ["--data", ml_indexed, "--period", "1", "model.period0=lora", "model.item_vectors=8"],
            None,
            "period 0 has no item vectors",
        ),
        (base + ["--data", ml_indexed, "model.item_vectors=-1"], None, "model.item_vectors must be 0 (off)"),
        (  # a job given GPUs, with a torch that cannot use them (here: the CPU build)
            base + ["--data", ml_indexed],
            {"CUDA_VISIBLE_DEVICES": "0,1"},
            "was given GPUs (CUDA_VISIBLE_DEVICES=0,1) but torch",
        ),
    ]
    for args, env, message in cases:
        proc = _main(args, env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_a_run_that_trained_on_gpus_does_not_go_on_on_the_cpu(tmp_path, ml_indexed):
    """A chain job that lost its GPUs must stop, not train the next period in fp32 on the CPU."""
    run = tmp_path / "run"
    (run / "periods" / "0").mkdir(parents=True)
    (run / "periods" / "0" / "config.json").write_text(json.dumps({"config": {}, "device": "cuda"}))
    args = ["--ds_config", os.path.join(REPO, "ds_configs", "zero2.json"), "--config", TINY, "--run", str(run)]
    args += ["--data", ml_indexed, "--period", "1", "model.period0=lora", "eval.max_users=8"]
    proc = _main(args, {"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "period 0 of" in proc.stderr and "trained on GPUs" in proc.stderr, proc.stderr
    assert "PESO_ALLOW_CPU=1" in proc.stderr
    # allowed explicitly, the same command gets past the check (and fails later for want of period 0's adapter)
    proc = _main(args, {"CUDA_VISIBLE_DEVICES": "", "PESO_ALLOW_CPU": "1"})
    assert "trained on GPUs" not in proc.stderr


def test_main_requires_an_item_index(tmp_path, ml_indexed):
    """A dataset without item_index.json: a clear error saying how to build one."""
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(ml_indexed, data, ignore=shutil.ignore_patterns("item_index*"))
    proc = _main(
        [
            "--ds_config",
            os.path.join(REPO, "ds_configs", "zero2.json"),
            "--config",
            TINY,
            "--data",
            data,
            "--run",
            str(tmp_path / "run"),
        ]
    )
    assert proc.returncode == 2
    assert "python -m data_tools index" in proc.stderr
    with open(os.path.join(data, "manifest.json")) as f:
        assert json.load(f)["windows"]


def test_every_key_has_a_help_text_and_print_config_shows_every_key():
    cfg = load_config(TINY, ["optim.lr=1e-4", "eval.ks=[5, 10]"])
    lines = describe(cfg).splitlines()
    fields = {f"{section}.{f.name}": f for section in cfg.to_dict() for f in dataclasses.fields(getattr(cfg, section))}
    assert [line.split()[0] for line in lines[1:]] == list(fields)
    assert not [key for key, f in fields.items() if not f.metadata["help"].strip()]
    row = {line.split()[0]: line for line in lines}
    assert row["optim.lr"].split()[1:4] == ["float", "0.0001", "0.0002"]
    assert row["eval.ks"].split()[1:] == [
        "list[int]",
        "[5,",
        "10]",
        "[5,",
        "10,",
        "20]",
        *["the", "K", "of", "Hit@K", "and", "NDCG@K"],
    ]
    assert row["model.path"].split()[1:6] == ["str", "|", "None", "null", "null"]


def test_resume_conflicts_name_the_keys_that_matter_with_old_and_new_values():
    started = load_config(TINY).to_dict()
    same_experiment = load_config(
        TINY,
        [
            "logging.every_steps=3",
            "eval.ks=[5]",
            "eval.beams=5",
            "checkpoint.every_steps=7",
            "data.num_workers=2",
            "data.path=/moved",
            "model.gradient_checkpointing=true",
        ],
    )
    assert resume_conflicts(started, same_experiment) == []
    changed = load_config(
        TINY, ["optim.lr=1e-3", "method.name=single", "lora.targets=[q_proj]", "data.micro_batch_size=8"]
    )
    assert resume_conflicts(started, changed) == [
        'lora.targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] -> ["q_proj"]',
        'method.name: "peso" -> "single"',
        "data.micro_batch_size: 16 -> 8",
        "optim.lr: 0.003 -> 0.001",
    ]
    del started["method"]["temperature"]  # a config.json written before the key existed
    assert resume_conflicts(started, load_config(TINY, ["method.temperature=0.8"])) == []
