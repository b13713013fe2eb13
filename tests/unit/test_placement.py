"""Device placement after `deepspeed.initialize` (train/dist/placement.py) and the precision policy
(train/model/build.py `hold_trainable_in`, `rope_in_fp32`), on a model shaped like a period's: LoRA,
code-token rows and the item-vector input added after the backbone was built.

A model built under ZeRO-3's zero.Init is not moved by DeepSpeed, so the strategy moves what was
left behind and refuses to train with anything misplaced. On a CPU machine every tensor is on the
CPU anyway; the meta device stands in for the GPU here, so that a buffer or parameter the move
forgets is seen."""

from __future__ import annotations

import torch

from tests.unit.test_item_vectors import table, tiny_model
from tests.unit.test_train_config import TINY
from train.common.config import load_config
from train.dist.placement import misplaced, move_to
from train.model.build import apply_lora, hold_trainable_in, rope_in_fp32
from train.model.item_vectors import attach_item_input


def period_model() -> torch.nn.Module:
    model = tiny_model().to(torch.bfloat16)
    attach_item_input(model, table([[1, 2, 3, 4], [0, 0, 0, 0]]), seed=0)
    cfg = load_config(TINY, ["lora.targets=[q_proj,v_proj]"])
    return apply_lora(model, cfg.lora, code_token_ids=list(range(200, 232)), seed=0)


def test_buffers_move_to_the_rank_device_and_a_misplaced_parameter_is_named():
    model = period_model()
    device = torch.device("meta")
    before = misplaced(model, device)
    # the item-vector input's lookup tables, made after the backbone, are among them
    assert any(".item_input.vectors" in name for name in before)
    assert any(".item_input.level_of" in name for name in before)
    move_to(model, device)
    assert all(buf.device == device for buf in model.buffers())
    # Parameters are DeepSpeed's to place; one it left behind is named, so the strategy refuses to train.
    assert misplaced(model, device) == [name for name, _ in model.named_parameters()]
    assert misplaced(period_model(), torch.device("cpu")) == []


def test_trainable_parameters_share_the_compute_dtype():
    """peft upcasts its adapters and token rows to fp32, the item projection follows the model
    (bf16): mixed trainable dtypes, which ZeRO-3 refuses (tests/dist/test_precision.py)."""
    model = period_model()
    for name, param in model.named_parameters():
        if "item_input" in name:
            param.requires_grad_(True)
    before = {p.dtype for p in model.parameters() if p.requires_grad}
    assert before == {torch.float32, torch.bfloat16}  # what peft and the model's dtype give
    hold_trainable_in(model, "bf16")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_rotary_frequencies_rounded_to_bf16_are_rebuilt_in_fp32():
    """What transformers before 5.24 leaves after building under ZeRO-3's zero.Init (its arange
    cast to bf16): the frequencies, hence every position's rotation, off."""
    exact = tiny_model().model.rotary_emb
    model = tiny_model()
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq.to(torch.bfloat16)
    rotary.original_inv_freq = rotary.original_inv_freq.to(torch.bfloat16)
    x, position = torch.zeros(1, 1, 8), torch.tensor([[2000]])
    with torch.no_grad():
        assert (rotary(x, position)[0] - exact(x, position)[0]).abs().max() > 1e-2  # the harm, at position 2000
        assert rope_in_fp32(model) == 1 and rope_in_fp32(model) == 0
        assert torch.equal(rotary(x, position)[0], exact(x, position)[0])
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, exact.inv_freq)
