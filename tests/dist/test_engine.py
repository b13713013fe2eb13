"""The training engine on real 2-rank DeepSpeed (CPU, gloo), ZeRO-2 and really-partitioned ZeRO-3."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from launcher.periods import local_command
from tests.dist.conftest import MAIN, QUICK, REPO, RESPONSE, env, kill_all_with, train
from train.dist.checkpoint import tag_step

CONFIG = os.path.join(REPO, "configs", "tiny.yaml")


def scalar_events(run: str, tag: str) -> list:
    """The points TensorBoard shows for `tag`, in the order read (a step twice if written twice)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars(tag)


def scalars(run: str, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in scalar_events(run, tag)}


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, cds_data, ds_configs):
    """Period 0 (full training of the tiny model, the paper's response objective) on 2 ranks,
    under ZeRO-2 and under ZeRO-3.

    ZeRO-3 computes linear layers with DeepSpeed's own autograd function (another summation
    order), and Adam's normalization magnifies such last-bit differences in small gradients, so
    the stages drift apart roughly in proportion to the learning rate: at 3e-4 they stay within
    1e-5 for these 12 steps (at 3e-3 they reach 6e-5)."""
    runs = {}
    for stage in (2, 3):
        run = str(tmp_path_factory.mktemp(f"z{stage}") / "run")
        train(
            2,
            [
                "--ds_config",
                ds_configs[stage],
                "--config",
                CONFIG,
                "--data",
                cds_data,
                "--run_dir",
                run,
                "schedule.max_steps=12",
                "checkpoint.every_steps=6",
                "optim.lr=3e-4",
                *QUICK,
                *RESPONSE,
            ],
        )
        runs[stage] = run
    return runs


def test_zero2_and_zero3_train_and_agree_step_by_step(zero_runs):
    losses = {stage: scalars(run, "train/loss") for stage, run in zero_runs.items()}
    assert sorted(losses[2]) == sorted(losses[3]) == list(range(1, 13))
    for stage in (2, 3):
        first, last = [losses[stage][s] for s in (1, 2, 3)], [losses[stage][s] for s in (10, 11, 12)]
        assert sum(last) / 3 < sum(first) / 3 - 0.05, f"ZeRO-{stage} loss did not fall: {losses[stage]}"
    for step in range(1, 13):
        assert abs(losses[2][step] - losses[3][step]) < 1e-5, f"step {step}: {losses[2][step]} vs {losses[3][step]}"


def test_tensorboard_holds_the_scalars(zero_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(zero_runs[3], "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "perf/input_tokens_per_s_per_rank",
        "perf/target_tokens_per_s_per_rank",
        "perf/samples_per_s_per_rank",
        "perf/tflops_per_rank",
        "perf/mfu_cpu_nominal",
        "perf/data_wait_share",
        "memory/cpu_max_rss_gib",
        "val/loss",
    ):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert all(v > 0 for v in scalars(zero_runs[3], "perf/tflops_per_rank").values())
    lr = scalars(zero_runs[3], "train/lr")
    assert lr[12] < lr[2]  # cosine decay


def test_full_model_export_equals_live_weights(zero_runs):
    """Period 0 trained in full: the exported model equals the fp32 weights in the last ZeRO-3
    checkpoint (another path to the live weights), and no tensor is empty."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = zero_runs[3]
    exported = load_file(os.path.join(run, "periods", "0", "model", "model.safetensors"))
    assert exported and all(t.numel() > 0 for t in exported.values())
    ckpt = os.path.join(run, "periods", "0", "ds_ckpt")
    with open(os.path.join(ckpt, "COMPLETE.json")) as f:
        tag = json.load(f)["tag"]
    live = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=tag)
    assert set(exported) <= set(live)
    for k, v in exported.items():
        assert torch.equal(v, live[k].to(v.dtype)), k


@pytest.fixture(scope="module")
def lora_period(tmp_path_factory, cds_data, ds_configs, zero_runs):
    """Periods 1 (the first LoRA) and 2 (PESO, pulled toward period 1's adapter) after the ZeRO-3
    period 0, on 2 ranks under ZeRO-3, each evaluated on 40 sampled test users of every window."""
    import shutil

    run = str(tmp_path_factory.mktemp("lora") / "run")
    shutil.copytree(zero_runs[3], run)
    for _ in range(2):
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
                "schedule.max_steps=4",
                *QUICK,
                *RESPONSE,
                "eval.every_period=true",
                "eval.max_users=40",
                "data.eval_batch_size=16",
            ],
        )
    return run


def test_peso_period_and_evaluation_under_zero3(lora_period):
    prox = scalars(lora_period, "train/proximal")
    assert len(prox) == 4 and prox[min(prox)] == 0.0 and max(prox.values()) > 0
    # How hard the term pulls, at every logged step (exact under ZeRO-3: tests/dist/test_methods.py):
    # nothing at the first step (the adapter is its anchor), then a small pull against the data.
    ratio, pull, data = (scalars(lora_period, f"pull/{k}") for k in ("ratio", "proximal_grad_norm", "data_grad_norm"))
    assert sorted(ratio) == sorted(prox) and ratio[min(ratio)] == 0.0 and all(v > 0 for v in data.values())
    assert all(ratio[s] == pytest.approx(pull[s] / data[s]) for s in ratio) and 0 < max(ratio.values()) < 1
    with open(os.path.join(lora_period, "periods", "2", "train_summary.json")) as f:
        summary = json.load(f)
    assert summary["pull_ratio_mean"] == pytest.approx(sum(ratio.values()) / 4)
    assert 0 < summary["adapter_relative_distance"] < 1  # period 2 moved its adapter, a little
    with open(os.path.join(lora_period, "periods", "1", "train_summary.json")) as f:
        first = json.load(f)  # the first LoRA period: no anchor, no pull; it started from zero B factors
    assert "pull_ratio_mean" not in first
    with open(os.path.join(lora_period, "periods", "2", "metrics.json")) as f:
        m = json.load(f)
    assert sorted(m["windows"]) == ["0", "1", "2"]  # row 2 of R: windows 0..2
    for j, w in m["windows"].items():
        assert w["users"] == 40 and w["invalid_outputs"] == 0
        assert sum(g["users"] for g in w["groups"].values()) == 40
        assert 0 <= w["overall"]["hit@5"] <= w["overall"]["hit@10"] <= w["overall"]["hit@20"] <= 1
        # the popularity reference, on the same users and groups
        assert w["users_in_window"] == {"0": 8494, "1": 1013, "2": 866}[j]
        assert {g: v["users"] for g, v in w["popularity"]["groups"].items()} == {
            g: v["users"] for g, v in w["groups"].items()
        }
        assert 0 <= w["popularity"]["overall"]["hit@5"] <= w["popularity"]["overall"]["hit@20"] <= 1
        # the transitions reference (the items that followed the users' last items), same users
        assert w["transitions"]["groups"].keys() == w["groups"].keys()
        assert 0 <= w["transitions"]["overall"]["hit@5"] <= w["transitions"]["overall"]["hit@20"] <= 1


def test_adapter_export_reloads_with_peft_on_a_plain_cpu_model(lora_period):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = os.path.join(lora_period, "periods", "2", "adapter")
    state = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    assert len([k for k in state if "lora_" in k]) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    assert any("trainable_tokens" in k for k in state)
    assert all(t.numel() > 0 for t in state.values())
    tok = AutoTokenizer.from_pretrained(os.path.join(lora_period, "tokenizer"))
    base = AutoModelForCausalLM.from_pretrained(os.path.join(lora_period, "periods", "0", "model"))
    model = PeftModel.from_pretrained(base, adapter)
    loaded = {
        n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n or "trainable_tokens" in n
    }
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    ids = torch.tensor([tok("The user has interacted with items <a_1><b_2><c_3><d_4>")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    # the adapter changed the model: LoRA B moved away from its zero init
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)


def test_next_period_on_one_rank_starts_from_a_two_rank_export(lora_period, cds_data, ds_configs, tmp_path):
    """Period 3 on a single process with lr 0 must hand over period 2's adapter unchanged."""
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(lora_period, run)
    train(
        1,
        [
            "--ds_config",
            ds_configs[3],
            "--config",
            CONFIG,
            "--data",
            cds_data,
            "--run",
            run,
            "schedule.max_steps=2",
            "optim.lr=0",
            "method.name=single",
            *QUICK,
            *RESPONSE,
        ],
    )
    before = load_file(os.path.join(run, "periods", "2", "adapter", "adapter_model.safetensors"))
    after = load_file(os.path.join(run, "periods", "3", "adapter", "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    with open(os.path.join(run, "state.json")) as f:
        assert json.load(f)["done"] == [0, 1, 2, 3]


def _resume_args(ds, data, run, objective):
    return [
        "--ds_config",
        ds,
        "--config",
        CONFIG,
        "--data",
        data,
        "--run_dir",
        run,
        "model.period0=lora",
        "schedule.max_steps=10",
        "checkpoint.every_steps=2",
        "checkpoint.keep=2",
        *QUICK,
        # the sequence objective also with item vectors: their trained projection resumes exactly too
        *(RESPONSE if objective == "response" else ["model.item_vectors=8"]),
    ]


def _log_past_the_checkpoint(run: str) -> None:
    """A point the killed run could have written after its last checkpoint (written here, so the
    test does not depend on when the kill landed): the resumed run writes that step again."""
    from torch.utils.tensorboard import SummaryWriter

    with open(os.path.join(run, "periods", "0", "ds_ckpt", "COMPLETE.json")) as f:
        step = tag_step(json.load(f)["tag"])
    with SummaryWriter(os.path.join(run, "tb")) as writer:
        writer.add_scalar("train/loss", 99.0, step + 1)


@pytest.mark.parametrize("objective", ["sequence", "response"])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, small_dataset, ds_configs, objective):
    """10 steps: the sequence objective's epoch (60 chunks) ends inside them, the response one's
    does not. The sequence run adds item vectors (model.item_vectors)."""
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    train(2, _resume_args(ds_configs[3], small_dataset, straight, objective))
    proc = subprocess.Popen(
        local_command(2, _resume_args(ds_configs[3], small_dataset, killed, objective), MAIN),
        env=env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    complete = os.path.join(killed, "periods", "0", "ds_ckpt", "COMPLETE.json")
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if os.path.exists(complete):
                with open(complete) as f:
                    if json.load(f)["client_state"]["micro"] >= 4:  # 4 steps in (one micro-batch per step)
                        break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.05)
        assert kill_all_with(killed) >= 3  # the launcher and both ranks, at once
    finally:
        proc.wait()
    assert not os.path.exists(os.path.join(killed, "periods", "0", "train_summary.json"))
    _log_past_the_checkpoint(killed)
    # Settings that may change when a period resumes (train/common/config.py) change here: it still resumes.
    resumed = train(
        2, _resume_args(ds_configs[3], small_dataset, killed, objective) + ["checkpoint.keep=3", "eval.max_users=7"]
    )
    step = int(re.search(r"resumed period 0 at epoch \d+, micro-batch \d+, step (\d+)", resumed.stdout).group(1))
    assert 4 <= step < 10  # it really resumed mid-epoch, with steps left to train
    # TensorBoard: every step once, none lost by the kill, none twice after the resume.
    assert sorted(e.step for e in scalar_events(killed, "train/loss")) == list(range(1, 11))
    # No terminal here: step lines carry the time, elapsed time and the period's ETA.
    assert re.search(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO period 0 step 10/10: loss .*, elapsed \d+:\d\d:\d\d, "
        r"ETA \d+:\d\d:\d\d$",
        resumed.stdout,
        re.M,
    ), resumed.stdout[-2000:]
    a = load_file(os.path.join(straight, "periods", "0", "adapter", "adapter_model.safetensors"))
    b = load_file(os.path.join(killed, "periods", "0", "adapter", "adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    if objective == "sequence":
        a, b = (
            load_file(os.path.join(r, "periods", "0", "adapter", "item_vectors.safetensors"))
            for r in (straight, killed)
        )
        assert a.keys() == b.keys() and torch.equal(a["vectors"], b["vectors"])
        assert torch.allclose(a["proj"], b["proj"], atol=1e-6, rtol=0)
    summaries = []
    for run in (straight, killed):
        with open(os.path.join(run, "periods", "0", "train_summary.json")) as f:
            summaries.append(json.load(f))
    assert summaries[0]["samples_seen"] == summaries[1]["samples_seen"] == 10 * 8
    assert summaries[0]["steps"] == summaries[1]["steps"] == 10
    # Throughput and the validation loss are reported in both objectives.
    assert all(v > 0 for v in scalars(straight, "perf/target_tokens_per_s_per_rank").values())
    assert all(v > 0 for v in scalars(straight, "perf/tflops_per_rank").values())
    assert 0 < scalars(straight, "val/loss")[10] < 10


@pytest.mark.slow  # compiles DeepSpeed's CPU Adam on first use (about a minute)
def test_zero3_offload_config_trains(tmp_path, cds_data):
    """ds_configs/zero3_offload.json as shipped: optimizer and parameters offloaded to the CPU,
    DeepSpeed's own AdamW (its "auto" values filled from the experiment), LoRA on 2 ranks."""
    run = str(tmp_path / "run")
    train(
        2,
        [
            "--ds_config",
            os.path.join(REPO, "ds_configs", "zero3_offload.json"),
            "--config",
            CONFIG,
            "--data",
            cds_data,
            "--run_dir",
            run,
            "model.period0=lora",
            "schedule.max_steps=3",
            *QUICK,
        ],
        timeout=900,
    )
    with open(os.path.join(run, "periods", "0", "config.json")) as f:
        ds = json.load(f)["ds_config"]
    assert ds["optimizer"]["params"]["lr"] == 3e-3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    state = load_file(os.path.join(run, "periods", "0", "adapter", "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # the optimizer stepped


def test_patience_ends_a_period_and_period0_has_its_own_epoch_cap(tmp_path, small_dataset, ds_configs):
    """With nothing to learn (lr 0) the validation loss never improves: period 0 stops after
    `patience` epochs past its best (epoch 0), below its cap; period 1 trains its own epochs."""
    run = str(tmp_path / "run")
    common = [
        "--ds_config",
        ds_configs[2],
        "--config",
        CONFIG,
        "--data",
        small_dataset,
        "--run",
        run,
        "optim.lr=0",
        "schedule.period0_epochs=8",
        "schedule.patience=2",
        "schedule.epochs=1",
        *QUICK,
    ]
    train(1, common)
    with open(os.path.join(run, "periods", "0", "train_summary.json")) as f:
        summary = json.load(f)
    assert summary["epochs_trained"] == 3 and summary["stopped_early"] and summary["best_epoch"] == 0
    assert len(set(summary["val_losses"])) == 1
    train(1, common)
    with open(os.path.join(run, "periods", "1", "train_summary.json")) as f:
        summary = json.load(f)
    assert summary["epochs_trained"] == 1 and not summary["stopped_early"]


def test_each_rank_flushes_exactly_the_checkpoint_files_it_wrote(zero_runs):
    """Every file of a 2-rank checkpoint has one rank to fsync it (O(ranks) syncs, not
    O(ranks^2)): the per-rank ZeRO partitions and RNG states their rank's, the rest rank 0's."""
    from train.dist.checkpoint import COMPLETE, files_of_rank

    for stage, run in zero_runs.items():
        folder = os.path.join(run, "periods", "0", "ds_ckpt")
        with open(os.path.join(folder, COMPLETE)) as f:
            tag = os.path.join(folder, json.load(f)["tag"])
        every = sorted(os.path.join(root, n) for root, _, names in os.walk(tag) for n in names)
        mine = {rank: files_of_rank(tag, rank) for rank in (0, 1)}
        assert sorted(mine[0] + mine[1]) == every and not set(mine[0]) & set(mine[1]), stage
        names = {rank: sorted(os.path.basename(p) for p in paths) for rank, paths in mine.items()}
        assert "rng-1.pt" in names[1] and any("zero_pp_rank_1_" in n for n in names[1]), names
        assert all("rank_0_" in n or n in ("rng-0.pt", "mp_rank_00_model_states.pt") for n in names[0]), names
