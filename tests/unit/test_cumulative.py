"""The cumulative baselines: which earlier adapters are frozen into the model, and their forward
against a sum written out by hand."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from train.common.config import load_config
from train.model.addons.frozen_sum import attach_frozen_adapters
from train.model.build import apply_lora
from train.model.lora import lora_layers
from train.period.plan import frozen_adapter_periods

NEW_TOKENS = list(range(100, 116))


def test_which_earlier_adapters_each_variant_freezes():
    full = load_config(None, ["model.shape=tiny", "model.period0=full"])
    lora = load_config(None, ["model.shape=tiny", "model.period0=lora"])
    assert frozen_adapter_periods(full, "cumulative", 3) == [2]  # the paper's "latest + inherit"
    assert frozen_adapter_periods(full, "cumulative", 1) == []  # a full period 0 has no adapter
    assert frozen_adapter_periods(full, "cumulative_all", 4) == [1, 2, 3]
    assert frozen_adapter_periods(lora, "cumulative", 1) == [0]
    assert frozen_adapter_periods(lora, "cumulative_all", 2) == [0, 1]
    assert frozen_adapter_periods(lora, "peso", 2) == []


def _base(layers: int = 2, tied: bool = False) -> LlamaForCausalLM:
    """A random Llama of 116 tokens, the last 16 (NEW_TOKENS) the code tokens."""
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=116,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
        )
    )


def _model():
    cfg = load_config(None, ["model.shape=tiny", "lora.r=4", "lora.dropout=0.0"])
    model = apply_lora(_base(), cfg.lora, NEW_TOKENS, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for m in (layer.lora_A["default"], layer.lora_B["default"]):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
    return model.eval()


def _adapter(folder: str, model, zero_b: bool = False) -> tuple[str, dict]:
    g = torch.Generator().manual_seed(3)
    state = {}
    for name, layer in lora_layers(model).items():
        a = torch.randn(layer.lora_A["default"].weight.shape, generator=g)
        b = (
            torch.zeros(layer.lora_B["default"].weight.shape)
            if zero_b
            else torch.randn(layer.lora_B["default"].weight.shape, generator=g)
        )
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "adapter_model.safetensors"))
    return folder, state


def test_frozen_previous_adapter_adds_its_normalized_product(tmp_path):
    model = _model()
    folder, state = _adapter(str(tmp_path / "prev"), model)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(4))
    layers = lora_layers(model)
    with torch.no_grad():
        before = {name: layer(x) for name, layer in layers.items() if name.endswith("q_proj")}
        attach_frozen_adapters(model, [folder])
        for name, out in before.items():
            a, b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
            by_hand = out + layers[name].scaling["default"] * (x @ (a / a.norm()).T) @ (b / b.norm()).T
            assert torch.allclose(layers[name](x), by_hand, atol=1e-5), name


def test_a_zero_factor_adds_nothing_and_no_nan(tmp_path):
    model = _model()
    folder, _ = _adapter(str(tmp_path / "zero"), model, zero_b=True)  # an adapter that never trained: B = 0
    ids = torch.randint(0, 116, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        attach_frozen_adapters(model, [folder])
        after = model(input_ids=ids).logits
    assert torch.isfinite(after).all() and torch.allclose(before, after, atol=1e-6)


def test_export_folds_the_frozen_sum_into_one_adapter_of_higher_rank(tmp_path):
    """cumulative's export (train/serve/export.py): the live adapter and the frozen,
    normalized previous one as one PEFT adapter of rank 2r, loaded on a plain backbone, give the
    logits of the model that trained and was evaluated."""
    from peft import PeftModel

    from train.common.run_folder import RunFolder
    from train.serve.export import folded_adapter, save_adapter

    run = RunFolder(str(tmp_path / "run"))
    cfg = load_config(None, ["model.shape=tiny", "model.period0=full", "method.name=cumulative", "lora.r=4"])
    live = _model()
    live.save_pretrained(run.adapter_dir(2))  # period 2's adapter, in the export format (PEFT)
    _adapter(run.adapter_dir(1), live)  # period 1's, frozen into period 2's forward
    ids = torch.randint(0, 116, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = live(input_ids=ids).logits
        attach_frozen_adapters(live, [run.adapter_dir(1)])
        evaluated = live(input_ids=ids).logits
    save_adapter(*folded_adapter(run, cfg, 2), str(tmp_path / "folded"), {})
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=116,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    exported = PeftModel.from_pretrained(base, str(tmp_path / "folded")).eval()
    assert exported.peft_config["default"].r == 8
    with torch.no_grad():
        out = exported(input_ids=ids).logits
    assert (evaluated - plain).abs().max() > 1e-3  # the frozen sum matters here
    assert torch.allclose(out, evaluated, atol=1e-5), (out - evaluated).abs().max()
