"""The GPU's precision path on 2 CPU ranks: bf16 with LoRA, the code-token rows and the
item-vector projection all trainable, under ZeRO-2 and really-partitioned ZeRO-3.

DeepSpeed's CPU accelerator runs bf16 (slowly), so what would crash the first GPU run is seen
here: peft upcasts its adapters to fp32 while the item projection is bf16, and ZeRO-3 asserts in
`deepspeed.initialize` that all trainable partitions share one dtype. The policy
(docs/precision.md): every parameter in the compute dtype, fp32 master weights in the optimizer,
the same under both stages."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.dist.conftest import QUICK, REPO, RESPONSE, train
from tests.dist.test_engine import scalars

CONFIG = os.path.join(REPO, "configs", "tiny.yaml")
BF16 = ["model.dtype=bf16", "model.period0=lora", "model.item_vectors=16", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, cds_data, ds_configs):
    """Period 0 (LoRA from the random tiny backbone, with item vectors) in bf16 under ZeRO-2 and
    ZeRO-3; then period 1 with peso under ZeRO-3."""
    runs = {}
    for stage in (2, 3):
        run = str(tmp_path_factory.mktemp(f"bf16-z{stage}") / "run")
        args = ["--ds_config", ds_configs[stage], "--config", CONFIG, "--data", cds_data, "--run_dir", run]
        train(2, [*args, "--period", "0", "schedule.max_steps=4", *BF16, *QUICK, *RESPONSE])
        runs[stage] = run
    args = ["--ds_config", ds_configs[3], "--config", CONFIG, "--data", cds_data, "--run_dir", runs[3]]
    # Period 1 at period 0's learning rate (not a tenth of it), so that the adapter moves away from
    # its anchor by far more than the fp32 rounding of the KL over a whole matrix (about 1e-6).
    period1 = ["schedule.max_steps=3", "method.lam=1", "optim.later_lr_factor=1.0"]
    train(2, [*args, "--period", "1", *period1, *BF16, *QUICK, *RESPONSE])
    return runs


def test_bf16_trains_with_one_trainable_dtype_under_zero2_and_zero3(bf16_runs):
    losses = {}
    for stage, run in bf16_runs.items():
        with open(os.path.join(run, "periods", "0", "config.json")) as f:
            recorded = json.load(f)
        assert recorded["precision"] == {"compute": "bf16", "trainable": ["bfloat16"]}, stage
        assert recorded["ds_config"]["bf16"]["enabled"] is True
        losses[stage] = {step: v for step, v in scalars(run, "train/loss").items() if step <= 4}  # period 0's
        assert len(losses[stage]) == 4
    # One policy, so the stages compute the same (up to bf16 rounding in another summation order).
    for step, loss in losses[2].items():
        assert loss == pytest.approx(losses[3][step], rel=1e-2), step


def test_bf16_exports_hold_the_weights_the_model_computes_with(bf16_runs):
    for run in bf16_runs.values():
        adapter = load_file(os.path.join(run, "periods", "0", "adapter", "adapter_model.safetensors"))
        assert adapter and all(t.numel() > 0 and t.dtype == torch.bfloat16 for t in adapter.values())
        vectors = load_file(os.path.join(run, "periods", "0", "adapter", "item_vectors.safetensors"))
        assert vectors["proj"].numel() > 0


def test_bf16_proximal_term_starts_at_zero_and_pulls(bf16_runs):
    """The anchor is the bf16 export the period starts from, so the term is exactly 0 at the first
    step (an anchor in another precision than the live weights would start above 0), then grows."""
    proximal = scalars(bf16_runs[3], "train/proximal")  # period 1's steps only: period 0 has no anchor
    steps = sorted(proximal)
    assert len(steps) == 3
    assert proximal[steps[0]] == 0.0
    assert all(proximal[step] > 1e-5 for step in steps[1:]), proximal
