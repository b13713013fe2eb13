"""Build the recommender for one period: the backbone, the item code tokens, LoRA or full training.

Where the backbone comes from:
- `model.path`: a local Hugging Face folder (a real pretrained model);
- `model.shape`: random weights of a named shape (train/model/shapes.py), built once by rank 0 into
  `<run>/base/` so every rank, period and restart loads the very same weights;
- after a full-training period 0 (`model.period0: full`), its exported model is the backbone of
  every later period.
Which of them a period loads, and whether it trains in full or LoRA, is its plan (train/period/plan.py).
Under ZeRO-3 the strategy's HfDeepSpeedConfig is alive before `from_pretrained`, so each rank
only ever materializes its own partition.

Trainable per LoRA period: the LoRA factors on the chosen projections and the embedding and
output rows of the item code tokens (peft's trainable tokens); everything else is frozen.
"""

from __future__ import annotations

import os

import peft
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from data_tools.atomic import written_aside
from data_tools.readback import check_safetensors, load_safetensors
from train.common.config import Config, LoraConfig
from train.common.run_folder import RunFolder
from train.dist.params import rank0_writes
from train.dist.peft_rows import patch_peft_token_rows_gather
from train.model.addons import owned
from train.model.shapes import shape_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


SHARD_SIZE = "2GB"  # safetensors shards of a written backbone: the most host memory one shard costs


def build_shape_backbone(cfg: Config, run: RunFolder, tokenizer, dtype: str, strategy) -> None:
    """Rank 0 writes the random-weight backbone of `model.shape` once; the others wait. It is
    built on rank 0's device, directly in the compute dtype (8B in bf16: 16 GB on the GPU, not
    48 GB of host memory for an fp32 build and its cast), and written shard by shard."""
    if strategy.is_rank0 and not os.path.isfile(os.path.join(run.base_dir, "config.json")):
        config = shape_config(
            cfg.model.shape, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        torch.manual_seed(cfg.model.seed)
        with strategy.plain_loading(), torch.device(strategy.device):
            model = LlamaForCausalLM._from_config(config, dtype=DTYPES[dtype])
        with written_aside("cannot write the run's backbone", run.base_dir) as tmp:
            model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        del model
        if strategy.cuda:
            torch.cuda.empty_cache()
    strategy.barrier()


def hidden_size(source: str) -> int:
    return AutoConfig.from_pretrained(source).hidden_size


def largest_lora_matrix(source: str, r: int) -> int:
    """Entries of the largest LoRA factor on a backbone: r x its widest projection's side."""
    config = AutoConfig.from_pretrained(source)
    return r * max(config.hidden_size, getattr(config, "intermediate_size", 0) or 0)


def init_new_token_rows(strategy, model: torch.nn.Module, first_new: int, seed: int) -> None:
    """Rows >= `first_new` of the input (and an untied output) embedding: N(0, std of the rows
    before them). Random, not all at the mean embedding (transformers' default): identical rows
    make every code token look alike, and training must first pull them apart. Seeded, so every
    rank writes the same values (rank 0's are kept if the rows are already partitioned)."""
    layers = [model.get_input_embeddings()]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not layers[0].weight:
        layers.append(out)
    generator = torch.Generator().manual_seed(seed)
    for layer in layers:
        weight = layer.weight
        with strategy.gathered([weight], modify=True), torch.no_grad():
            std = float(weight[:first_new].float().std())
            rows = torch.randn((weight.shape[0] - first_new, weight.shape[1]), generator=generator) * std
            weight[first_new:] = rows.to(weight.dtype)


def rope_in_fp32(model: torch.nn.Module) -> int:
    """Rotary embeddings whose inverse frequencies came out in another dtype than fp32 get them
    rebuilt in fp32; returns how many. transformers before 5.24 builds a model under ZeRO-3's
    `zero.Init`, which casts `torch.arange` to the training dtype, so in bf16 the frequencies were
    rounded (an error of up to 0.2% of each, times the position) and ZeRO-3 trained on other
    positions than ZeRO-2 or the exported model; 5.24 guards the arange (transformers'
    `prevent_arange_dtype_change`). The module is built again outside zero.Init, from its config."""
    fixed = 0
    for module in model.modules():
        inv = getattr(module, "inv_freq", None)
        if not isinstance(inv, torch.Tensor) or inv.dtype == torch.float32 or not hasattr(module, "config"):
            continue
        fresh = type(module)(module.config)
        for name in ("inv_freq", "original_inv_freq"):
            if isinstance(getattr(module, name, None), torch.Tensor):
                setattr(module, name, getattr(fresh, name).to(inv.device))
        fixed += 1
    return fixed


def load_backbone(strategy, source: str, cfg: Config, dtype: str, vocab_size: int) -> torch.nn.Module:
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise FileNotFoundError(f"{source} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=DTYPES[dtype], attn_implementation=cfg.model.attn_implementation
    )
    rope_in_fp32(model)
    rows = model.get_input_embeddings().num_embeddings
    if rows < vocab_size:
        # New rows for the item code tokens (they are trained every period).
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        init_new_token_rows(strategy, model, rows, cfg.model.seed)
    if cfg.model.gradient_checkpointing:
        # Reentrant checkpointing silently drops gradients of terms computed in LoRA hooks and
        # breaks ZeRO-3 reduction (docs/zero3.md, "Gradient checkpointing"): always non-reentrant.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def apply_lora(model: torch.nn.Module, lora: LoraConfig, code_token_ids: list[int], seed: int) -> peft.PeftModel:
    """LoRA on the chosen projections plus trainable rows for the code tokens. Seeded, so every
    rank (and a resumed run) starts from the same factors."""
    patch_peft_token_rows_gather()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    # Untied: both the embedding and the output layer need the rows (the list form would wrap
    # only the embedding, leaving the output rows untrained and unsaved). Tied: one shared delta.
    tokens = list(code_token_ids) if tied else {"embed_tokens": list(code_token_ids), "lm_head": list(code_token_ids)}
    peft_config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        trainable_token_indices=tokens,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    return peft.get_peft_model(model, peft_config)


def hold_trainable_in(model: torch.nn.Module, dtype: str) -> None:
    """The precision policy, the same under every ZeRO stage (docs/precision.md): every parameter
    of the model, frozen or trainable, is held in the compute dtype; DeepSpeed's optimizer keeps
    an fp32 master copy of each trainable one and updates it in fp32. peft upcasts its adapters
    (and the code-token rows) to fp32 and the item-vector projection follows the model's dtype:
    under ZeRO-3 a bf16 model with fp32 adapters beside a bf16 projection fails in
    `deepspeed.initialize` (every trainable partition must share one dtype), and under ZeRO-2
    DeepSpeed casts every parameter to bf16 anyway. So the trainable parameters are cast here,
    before DeepSpeed sees them."""
    target = DTYPES[dtype]
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != target:
            param.data = param.data.to(target)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases and the new-token rows (embeddings)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "trainable_tokens" in name or "embed" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adapter_state_keys(model: peft.PeftModel) -> dict[str, torch.nn.Parameter]:
    """Saved-key -> live parameter for everything an adapter export holds (peft's key names)."""
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or owned(name):  # an add-on's: it has its own file
            continue
        key = name.replace(".default.", ".").replace(".default", "")
        out[key] = param
    return out


def load_adapter_weights(strategy, model: peft.PeftModel, adapter_dir: str) -> None:
    """Copy an exported adapter into the live (possibly partitioned) trainable parameters."""
    state = load_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"), what="the adapter")
    live = adapter_state_keys(model)
    missing, unexpected = set(live) - set(state), set(state) - set(live)
    if missing or unexpected:
        raise ValueError(
            f"{adapter_dir} does not fit this model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    with rank0_writes(strategy, live.values()) as writes:
        if writes:
            with torch.no_grad():
                for key, p in live.items():
                    p.copy_(state[key].to(p.dtype))


def load_full_weights(strategy, model: torch.nn.Module, model_dir: str) -> None:
    """Copy an exported full model (period 0 trained in full) into the live, possibly partitioned,
    model, one module at a time."""
    from safetensors import safe_open

    path = os.path.join(model_dir, "model.safetensors")
    check_safetensors(path, what="the exported model's weights")
    loaded = set()
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        for prefix, module in model.named_modules():
            params = dict(module.named_parameters(recurse=False))
            names = {n: f"{prefix}.{n}" if prefix else n for n in params}
            names = {n: k for n, k in names.items() if k in keys}  # a tied output layer is stored once
            if not names:
                continue
            with rank0_writes(strategy, [params[n] for n in names]) as writes:
                if writes:
                    with torch.no_grad():
                        for n, key in names.items():
                            params[n].copy_(f.get_tensor(key).to(params[n].dtype))
            loaded.update(names.values())
    if loaded != keys:
        raise ValueError(
            f"{path} does not fit this model: {len(keys - loaded)} tensors unused (first: {sorted(keys - loaded)[:2]})"
        )
