"""Run by tests/dist/test_methods.py under torchrun (2 ranks, ZeRO-3, every parameter partitioned)
or as a single plain process (the reference). Computes, with the project's own code:

- peso / l2: the proximal term and the full gradient it puts on every LoRA parameter (the loss is
  0 x logits + term, so the gradient is the term's alone);
- cumulative: the logits of a model whose earlier adapters are frozen and summed in;
- sequence: the training loss of the sequence objective (chunks of different lengths on each
  rank, so each rank's output layer runs on another number of positions) plus the peso term,
  and the gradient of every trainable parameter (LoRA factors and the new-token rows).

and saves them (rank 0) to OUT for the test to compare.

- vectors: the same as sequence, on a model with item vectors (train/model/item_vectors.py), whose
  projection's gradient is compared too.
- pull_all: vectors with `method.pull: all`: the term also pulls the code-token rows and the
  projection toward an anchor of theirs.

    python probe_methods.py {zero3|plain} {kl|l2|cumulative|sequence|vectors|pull_all} OUT [BASE]

BASE: a Hugging Face folder to use instead of the tiny random model (a real backbone such as
SmolLM2-135M; its vocabulary holds the token ids used here).
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from train.common.config import load_config  # noqa: E402
from train.dist.params import whole_shape  # noqa: E402
from train.loop.data import collate  # noqa: E402
from train.loop.loss import lm_loss  # noqa: E402
from train.methods.proximal import ProximalTerm, pull_and_data_norms, pulled_tensors  # noqa: E402
from train.model.addons.frozen_sum import attach_frozen_adapters  # noqa: E402
from train.model.build import apply_lora  # noqa: E402
from train.model.item_vectors import attach_item_input, item_input_of  # noqa: E402
from train.model.lora import lora_layers  # noqa: E402

NEW_TOKENS = list(range(200, 232))


def build(tmp: str):
    """The same tiny model, LoRA factors (A and B both random) and anchor on every rank."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=232,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    base = os.path.join(tmp, "base")
    if not os.path.isdir(base):
        LlamaForCausalLM(config).save_pretrained(base)
    return base


# 12 items; the last 2 have no vector
ITEM_CODES = [torch.randint(0, 8, (4,), generator=torch.Generator().manual_seed(20 + i)).tolist() for i in range(12)]


def item_vectors() -> dict:
    """A table of 10 items (4 levels of 8 codes: token 200 + 8 x level + code) with random vectors."""
    g = torch.Generator().manual_seed(5)
    return {
        "codes": torch.tensor([ITEM_CODES[i] for i in range(10)]),
        "vectors": torch.randn(10, 6, generator=g),
        "code_token_ids": torch.tensor(NEW_TOKENS).reshape(4, 8),
    }


def lora_model(base: str, cfg, with_item_vectors: bool = False):
    model = LlamaForCausalLM.from_pretrained(base)
    if with_item_vectors:
        attach_item_input(model, item_vectors(), seed=7)
    model = apply_lora(model, cfg.lora, NEW_TOKENS, seed=1)
    if with_item_vectors:
        item_input_of(model).proj.requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for m in (layer.lora_A["default"], layer.lora_B["default"]):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
    return model


def anchor_of(model) -> dict:
    g = torch.Generator().manual_seed(3)
    out = {}
    for name, layer in lora_layers(model).items():
        for which in ("lora_A", "lora_B"):
            w = getattr(layer, which)["default"].weight.detach()
            out[f"{name}.{which}.weight"] = w + 0.05 * torch.randn(w.shape, generator=g)
    return out


def anchor_of_everything(model) -> dict:
    """method.pull=all's anchor: every pulled tensor (LoRA factors, code-token rows, projection)
    moved by N(0, 0.05), before ZeRO-3 partitions them (they are whole on every rank then)."""
    g = torch.Generator().manual_seed(3)
    out = {}
    for key, (module, weight_of) in pulled_tensors(model, "all").items():
        w = weight_of(module).detach()
        out[key] = w + 0.05 * torch.randn(w.shape, generator=g)
    return out


def sequence_batch(half: int, items: bool = False) -> dict:
    """One rank's micro-batch of the sequence objective: chunks of items (4 code tokens each)
    after a BOS, the codes of the items from `first` on labelled. `items`: the items of
    ITEM_CODES (each level's own tokens); else any code tokens."""
    g = torch.Generator().manual_seed(10 + half)
    examples = []
    for n_items, first in ((5, 2), (3, 0)) if half == 0 else ((7, 1), (2, 0), (4, 3)):
        ids, labels = [1], [-100]
        for k in range(n_items):
            if items:
                item = ITEM_CODES[int(torch.randint(0, 12, (1,), generator=g))]
                codes = [200 + 8 * level + c for level, c in enumerate(item)]
            else:
                codes = torch.randint(200, 232, (4,), generator=g).tolist()
            ids += codes
            labels += codes if k >= first else [-100] * 4
        examples.append({"input_ids": ids, "labels": labels})
    return collate(examples, pad_id=0)


def mean_ce(model, batch: dict) -> torch.Tensor:
    total, count = lm_loss(model, batch, temperature=0.8)
    return total / count


def frozen_adapters(tmp: str, model) -> list[str]:
    """Two earlier adapters on disk (random factors), in peft's key names."""
    dirs = []
    for k in range(2):
        g = torch.Generator().manual_seed(10 + k)
        state = {}
        for name, layer in lora_layers(model).items():
            for which in ("lora_A", "lora_B"):
                w = getattr(layer, which)["default"].weight
                state[f"{name}.{which}.weight"] = torch.randn(whole_shape(w), generator=g)
        d = os.path.join(tmp, f"adapter{k}")
        os.makedirs(d, exist_ok=True)
        save_file(state, os.path.join(d, "adapter_model.safetensors"))
        dirs.append(d)
    return dirs


def main():
    mode, kind, out = sys.argv[1], sys.argv[2], sys.argv[3]
    tmp = os.path.dirname(out)
    cfg = load_config(None, ["model.shape=tiny", "lora.r=4", "lora.dropout=0.0", "method.reduce=sum"])
    ids = torch.randint(0, 232, (2, 12), generator=torch.Generator().manual_seed(4))
    given = sys.argv[4] if len(sys.argv) > 4 else None
    vectors = kind in ("vectors", "pull_all")  # the sequence probe, on a model with item vectors
    pull = "all" if kind == "pull_all" else "lora"
    if mode == "plain":
        base = given or build(tmp)
        model = lora_model(base, cfg, vectors)
        if kind == "cumulative":
            attach_frozen_adapters(model, frozen_adapters(tmp, model))
            with torch.no_grad():
                logits = model(input_ids=torch.cat([ids, ids + 1])).logits
            save_file({"logits": logits.contiguous()}, out)
            return
        if kind in ("sequence", "vectors", "pull_all"):
            # The two ranks' micro-batches, each normalized by its own labelled tokens, averaged
            # (as DeepSpeed averages the ranks' gradients); the term is counted once.
            anchor = anchor_of_everything(model) if pull == "all" else anchor_of(model)
            prox = ProximalTerm(model, anchor, "kl", "sum", pull=pull)
            with prox.collect():
                first = mean_ce(model, sequence_batch(0, vectors))
            term = prox.term()
            data = (first + mean_ce(model, sequence_batch(1, vectors))) / 2
            # The pull against the data on the LoRA factors, by autograd: each part's own gradient.
            lora = list(prox.params.values())
            norm = lambda parts: torch.sqrt(sum(g.pow(2).sum() for g in parts)).reshape(1)
            pull_norm = norm(torch.autograd.grad(term, lora, retain_graph=True))
            data_norm = norm(torch.autograd.grad(data, lora, retain_graph=True))
            (data + term).backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            save_file({"term": term.detach().reshape(1), "pull_norm": pull_norm, "data_norm": data_norm, **grads}, out)
            return
        prox = ProximalTerm(model, anchor_of(model), kind, "sum")
        with prox.collect():
            logits = model(input_ids=ids).logits
        term = prox.term()
        (0.0 * logits.sum() + term).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        save_file({"term": term.detach().reshape(1), **grads}, out)
        return

    from train.dist.strategy import DeepSpeedStrategy

    strategy = DeepSpeedStrategy()
    base = given or (build(tmp) if strategy.is_rank0 else os.path.join(tmp, "base"))
    strategy.barrier()
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2 * strategy.world_size,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    strategy.use_ds_config(ds)
    model = lora_model(base, cfg, vectors)
    anchor = anchor_of_everything(model) if pull == "all" else anchor_of(model)
    frozen = frozen_adapters(tmp, model) if kind == "cumulative" else None
    if frozen:
        attach_frozen_adapters(model, frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = strategy.initialize(model, [{"params": params}], lambda g: torch.optim.SGD(g, lr=0.0), lambda o: None)
    lora = [p for n, p in engine.module.named_parameters() if "lora_" in n and p.requires_grad]
    assert all(p.numel() == 0 for p in lora), "parameters are not partitioned"
    if kind == "cumulative":
        # Each rank decodes its own half of the batch: the forward gathers the frozen sums too.
        x = ids if strategy.rank == 0 else ids + 1
        with torch.no_grad():
            logits = engine(input_ids=x).logits
        import deepspeed.comm as dist

        both = [torch.zeros_like(logits) for _ in range(strategy.world_size)]
        dist.all_gather(both, logits)
        if strategy.is_rank0:
            save_file({"logits": torch.cat(both).contiguous()}, out)
        strategy.close()
        return
    from deepspeed.utils import safe_get_full_grad

    if kind in ("sequence", "vectors", "pull_all"):
        prox = ProximalTerm(engine.module, anchor, "kl", "sum", pull=pull)
        with prox.collect():
            ce = mean_ce(engine, sequence_batch(strategy.rank, vectors))
        term = prox.term()
        engine.backward(ce + term)
        # What the trainer logs at a logging step: the closed-form pull against the data's share
        # of the reduced gradient (collective).
        pull_norm, data_norm = pull_and_data_norms(prox, 1.0, strategy.full_grads(prox.params))
        grads = {
            n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad
        }
        if strategy.is_rank0:
            norms = {"pull_norm": torch.tensor([pull_norm]), "data_norm": torch.tensor([data_norm])}
            save_file({"term": term.detach().reshape(1), **norms, **grads}, out)
        strategy.close()
        return
    prox = ProximalTerm(engine.module, anchor, kind, "sum")
    with prox.collect():
        logits = engine(input_ids=ids).logits  # the same batch on both ranks: averaged gradients equal one process's
    term = prox.term()
    # As in training, the loss also holds the model's output (here x 0): the term's gradient
    # reaches each LoRA weight together with the backward through its module, which is when
    # ZeRO-3 has that weight whole again.
    engine.backward(0.0 * logits.sum() + term)
    grads = {
        n: safe_get_full_grad(p).detach().clone()
        for n, p in engine.module.named_parameters()
        if "lora_" in n and p.requires_grad
    }
    if strategy.is_rank0:
        save_file({"term": term.detach().reshape(1), **grads}, out)
    strategy.close()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # see train/main.py: skip a teardown that sometimes aborts
