"""Which from-scratch model learns to recommend on a CPU: shapes and objectives at equal time.

    python bench/cpu_models.py [--minutes 12] [--data DIR] [--window 0]

Each variant trains a random-weight Llama on one window of the CDs blocks (or --data) for the
same wall-clock budget on one core (two variants at a time, one per core), keeps the epoch with
the best validation loss, and scores it like the evaluation does (trie-constrained beam search,
--beams) on the window's test users (all, or a seeded sample of --users), beside the window's 10
most popular items on the same users. A plain PyTorch loop on the items' code tokens alone (no tokenizer, no DeepSpeed):
it measures how fast each variant learns, not the framework. Prints one JSON line.

The variants (VARIANTS): the `tiny` shape (hidden 64, 2 layers) untied and tied, with more
regularization, and with the response objective (one sample per target) instead of the sequence
objective; the `mini` shape (hidden 128) at several learning rates and schedules, with level
weights in the loss, wider, and with item-level inputs (the item's summed code embeddings, or a
hashed per-item table, at its last code token). Beside each variant's metrics: the same beams
without the user's own items (`excluding_history`), popularity and a transitions reference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CDS = os.path.join(os.path.dirname(REPO), "shared", "data", "amazon-cds-blocks")
VARIANTS = {  # a shape of train/model/shapes.py, its embeddings tied or not, the optimizer, the objective
    "tiny (sequence)": dict(shape="tiny", lr=3e-3),
    "tiny, tied embeddings (sequence)": dict(shape="tiny", tied=True, lr=3e-3),
    "tiny, weight decay 0.1, attention dropout 0.1 (sequence)": dict(
        shape="tiny", lr=3e-3, weight_decay=0.1, dropout=0.1
    ),
    "tiny (response: one sample per target)": dict(shape="tiny", lr=3e-3, objective="response"),
    "mini, lr 1e-3, weight decay 0.1 (sequence)": dict(shape="mini", lr=1e-3, weight_decay=0.1),
    "mini, lr 2e-3, weight decay 0.1 (sequence)": dict(shape="mini", lr=2e-3, weight_decay=0.1),
    "tiny, dropout 0.2 on embeddings, attention and MLP outputs (sequence)": dict(
        shape="tiny", lr=3e-3, residual_dropout=0.2
    ),
    "tiny, cosine to zero over the budget (sequence)": dict(shape="tiny", lr=3e-3, cosine=True),
    "mini, lr 1e-3, weight decay 0.1, cosine to zero over the budget (sequence)": dict(
        shape="mini", lr=1e-3, weight_decay=0.1, cosine=True
    ),
    "mini, lr 2e-3, weight decay 0.1, cosine to zero over the budget (sequence)": dict(
        shape="mini", lr=2e-3, weight_decay=0.1, cosine=True
    ),
    "mini, lr 2e-3, weight decay 0.1 but not on embeddings and norms (as the framework), cosine (sequence)": dict(
        shape="mini", lr=2e-3, weight_decay=0.1, cosine=True, framework_groups=True
    ),
    "mini, lr 3e-3, weight decay 0.1, cosine to zero over the budget (sequence)": dict(
        shape="mini", lr=3e-3, weight_decay=0.1, cosine=True
    ),
    "mini, lr 1e-3, weight decay 0.1, cosine, warmup 2% (the framework's recipe) (sequence)": dict(
        shape="mini", lr=1e-3, weight_decay=0.1, cosine=True
    ),
    # The first two code levels weighted up in the training loss (weights average 1 per item).
    "mini, lr 1e-3, weight decay 0.1, cosine, level weights 1.5/1.5/0.5/0.5 (sequence)": dict(
        shape="mini", lr=1e-3, weight_decay=0.1, cosine=True, level_weights=[1.5, 1.5, 0.5, 0.5]
    ),
    "mini, lr 1e-3, weight decay 0.1, cosine, level weights 2/1/0.5/0.5 (sequence)": dict(
        shape="mini", lr=1e-3, weight_decay=0.1, cosine=True, level_weights=[2.0, 1.0, 0.5, 0.5]
    ),
    # Hidden 256 on mini's two layers: a simple transition count (last item -> next item) ranks
    # 5x better than popularity on CDs window 0, so the models may lack the width to memorize
    # item-to-item transitions.
    "wide (hidden 256, 2 layers), lr 1e-3, weight decay 0.1, cosine (sequence)": dict(
        shape="mini",
        lr=1e-3,
        weight_decay=0.1,
        cosine=True,
        dims=dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2),
    ),
    # Item-level input: at each item's last code token (where the whole item is known, and which
    # predicts the next item's first code) the input embedding also gets the item's summed code
    # embeddings, or a hashed embedding of the item's full code tuple (memorization capacity).
    "mini, lr 1e-3, weight decay 0.1, cosine, item input = summed code embeddings (sequence)": dict(
        shape="mini", lr=1e-3, weight_decay=0.1, cosine=True, item_input="sum"
    ),
    "mini, lr 1e-3, weight decay 0.1, cosine, item input = hashed item embedding (sequence)": dict(
        shape="mini", lr=1e-3, weight_decay=0.1, cosine=True, item_input="hash"
    ),
    # The hashed table overfits (each user's sequence memorized): drop an item's whole vector
    # with probability 0.5 in training, no weight decay on the table; or give a row only to items
    # seen at least 3 times in the window's training sequences.
    "mini, lr 1e-3, weight decay 0.1, cosine, hashed item embedding, row dropout 0.5 (sequence)": dict(
        shape="mini", lr=1e-3, weight_decay=0.1, cosine=True, item_input="hash", item_dropout=0.5
    ),
    # Collaborative item vectors (as LLaRA and CoLLM give an LLM a sequential recommender's item
    # embeddings): a truncated SVD of the positive PMI of items co-occurring within 3 positions in
    # the window's training sequences, fixed, through a learned projection, at the last code token.
    "mini, lr 1e-3, weight decay 0.1, cosine, item input = co-occurrence SVD vectors (sequence)": dict(
        shape="mini", lr=1e-3, weight_decay=0.1, cosine=True, item_input="cooc"
    ),
    "tiny, item input = co-occurrence SVD vectors (sequence)": dict(shape="tiny", lr=3e-3, item_input="cooc"),
    "mini, lr 1e-3, weight decay 0.1, cosine, hashed item embedding for items seen 3+ times, row dropout 0.3 (sequence)": dict(
        shape="mini", lr=1e-3, weight_decay=0.1, cosine=True, item_input="hash", item_dropout=0.3, item_min_count=3
    ),
}
PAD, BOS, EOS, FIRST_CODE = 0, 1, 2, 3


def add_residual_dropout(model, p: float) -> None:
    import torch.nn.functional as F

    def drop(module, inputs, output):
        if isinstance(output, tuple):
            return (F.dropout(output[0], p, module.training), *output[1:])
        return F.dropout(output, p, module.training)

    model.model.embed_tokens.register_forward_hook(drop)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(drop)
        layer.mlp.register_forward_hook(drop)


ITEM_TABLE_ROWS = 65536  # the hashed item table of the item-input variants


def item_key(ids, levels: int, per_level: int):
    """For every position: the codes of the item that ends there, as one integer (meaningful only
    at an item's last code token, whose `levels - 1` predecessors are its other codes)."""
    return sum(((ids.roll(k, 1) - FIRST_CODE) % per_level) * per_level ** (levels - 1 - k) for k in range(levels))


def cooccurrence_vectors(train: list, codes: dict, levels: int, per_level: int, dim: int = 64):
    """(sorted item keys, unit vectors [items, dim]): the framework's builder
    (data_tools/cooccurrence.py, `model.item_vectors`) on the users' training sequences."""
    import torch

    from data_tools.cooccurrence import cooccurrence_counts, ppmi_svd_vectors
    from data_tools.sequences import user_sequences

    counts = cooccurrence_counts(s["context"] + s["targets"] for s in user_sequences(train))
    items, vectors = ppmi_svd_vectors(counts, dim)
    keys = item_key(torch.tensor([codes[i] for i in items]), levels, per_level)[:, -1]
    order = torch.argsort(keys, stable=True)  # items sharing every code: the first keeps the row
    return keys[order].contiguous(), torch.from_numpy(vectors)[order]


def item_input_embedder(model, spec: dict, train: list, codes: dict, levels: int, per_level: int):
    """The input embedding of the variant: the token embeddings, plus (`item_input`) at each
    item's last code token, where the whole item is known and the next item's first code is
    predicted, its summed code embeddings ("sum") or a row of a hashed per-item table ("hash":
    memorization capacity), optionally dropped per position in training (`item_dropout`) or
    given only to items seen `item_min_count` times in the window's training sequences.
    Returns (embed(ids), the table or None)."""
    import torch

    from data_tools.sequences import window_chunks

    kind = spec.get("item_input")
    last_level = FIRST_CODE + (levels - 1) * per_level
    table = None
    if kind == "cooc":
        keys, vectors = cooccurrence_vectors(train, codes, levels, per_level)
        model.cooc_proj = table = torch.nn.Linear(vectors.shape[1], model.config.hidden_size, bias=False)
    if kind == "hash":
        table = torch.nn.Embedding(ITEM_TABLE_ROWS, model.config.hidden_size)
        torch.nn.init.normal_(table.weight, std=0.02)
        model.item_table = table  # registered, so the optimizer and the saved best state see it
    frequent = None
    if spec.get("item_min_count"):
        seen: dict = {}
        for c in window_chunks(train, 20):
            for item in c["items"]:
                seen[item] = seen.get(item, 0) + 1
        ids = torch.tensor([codes[i] for i, n in seen.items() if n >= spec["item_min_count"]])
        frequent = item_key(ids, levels, per_level)[:, -1]

    def embed(ids):
        e = model.model.embed_tokens(ids)
        if not kind:
            return e
        if kind == "sum":
            extra = sum(e.roll(k, 1) for k in range(levels))
        elif kind == "cooc":
            key = item_key(ids, levels, per_level)
            row = torch.searchsorted(keys, key).clamp(max=len(keys) - 1)
            known = (keys[row] == key).unsqueeze(-1)  # items outside the window's training sequences: none
            extra = table(vectors[row]) * known
        else:
            key = item_key(ids, levels, per_level)
            extra = table(((key % 2**31) * 2654435761) % ITEM_TABLE_ROWS)  # Knuth's multiplicative hash
            keep = torch.ones_like(ids, dtype=torch.bool)
            if frequent is not None:
                keep &= torch.isin(key, frequent)
            if model.training and spec.get("item_dropout"):
                keep &= torch.rand(ids.shape) >= spec["item_dropout"]
            extra = extra * keep.unsqueeze(-1)
        return e + torch.where((ids >= last_level).unsqueeze(-1), extra, torch.zeros_like(extra))

    return embed, table


def run_variant(
    name: str,
    spec: dict,
    data: str,
    window: int,
    minutes: float,
    users: int | None = None,
    beams: int = 10,
    epochs: int | None = None,
    eval_epochs: list[int] | None = None,
    seed: int = 0,
) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_tools.index.codes import load_item_index
    from data_tools.index.trie import CodeTrie
    from data_tools.reader import window_split
    from data_tools.sequences import window_chunks
    from train.evaluation.evaluator import CACHE_ARG, constrained_beam_search, rank_metrics
    from train.model.build import param_groups
    from train.model.shapes import SHAPES

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    index = load_item_index(data)
    levels, per_level = index["levels"], index["codes_per_level"]
    codes = {
        int(k): [FIRST_CODE + lv * per_level + int(t.split("_")[1].rstrip(">")) for lv, t in enumerate(v)]
        for k, v in index["items"].items()
    }
    objective = spec.get("objective", "sequence")

    def prompt(history):
        return [BOS] + [t for item in history[-20:] for t in codes[item]]

    def one_target(history, target):
        p = prompt(history) + ([] if objective == "sequence" else [EOS])
        tail = codes[target] + ([] if objective == "sequence" else [EOS])
        return p + tail, [-100] * len(p) + tail

    def chunk(c):
        ids, labels = [BOS], [-100]
        for k, item in enumerate(c["items"]):
            ids += codes[item]
            labels += codes[item] if k >= c["first_target"] else [-100] * levels
        return ids, labels

    def batch(examples):
        width = max(len(x) for x, _ in examples)
        ids = torch.full((len(examples), width), PAD)
        labels = torch.full((len(examples), width), -100)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, (x, y) in enumerate(examples):
            ids[i, width - len(x) :], labels[i, width - len(y) :], mask[i, width - len(x) :] = (
                torch.tensor(x),
                torch.tensor(y),
                1,
            )
        return ids, labels, mask, (mask.cumsum(1) - 1).clamp(min=0)

    train = list(window_split(data, window, "train"))
    examples = (
        [chunk(c) for c in window_chunks(train, 20)]
        if objective == "sequence"
        else [one_target(s["history"], s["target"]) for s in train]
    )
    valid = [one_target(s["history"], s["target"]) for s in window_split(data, window, "valid")][:2000]
    tests = list(window_split(data, window, "test"))
    users = random.Random(0).sample(tests, users) if users and users < len(tests) else tests
    shape = {k: v for k, v in SHAPES[spec["shape"]].items() if k != "min_vocab"} | spec.get("dims", {})
    shape["tie_word_embeddings"] = spec.get("tied", shape["tie_word_embeddings"])
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=FIRST_CODE + levels * per_level,
            attention_dropout=spec.get("dropout", 0.0),
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=PAD,
            **shape,
        )
    )
    if spec.get(
        "residual_dropout"
    ):  # SASRec-style dropout, which Llama lacks: on the embeddings and each block's outputs
        add_residual_dropout(model, spec["residual_dropout"])
    embed, item_table = item_input_embedder(model, spec, train, codes, levels, per_level)
    params = sum(p.numel() for p in model.parameters())
    decay = spec.get("weight_decay", 0.01)
    # The framework (train/model/build.py) exempts embeddings and norms from weight decay; this loop
    # decays everything unless the variant asks for the framework's groups.
    groups = param_groups(model, decay) if spec.get("framework_groups") else model.parameters()
    if item_table is not None and spec.get("item_dropout"):
        groups = [
            {"params": [p for n, p in model.named_parameters() if not n.startswith("item_table")]},
            {"params": list(item_table.parameters()), "weight_decay": 0.0},
        ]
    opt = torch.optim.AdamW(
        groups,
        lr=spec["lr"],
        weight_decay=decay,
    )
    t0 = time.time()
    steps_per_epoch = math.ceil(len(examples) / 32)
    opt_steps = [0]  # optimizer steps so far (the scheduler reads it from its first call)

    def done_share() -> float:  # of the budget: the minutes, or --epochs
        if epochs:
            return min(1.0, opt_steps[0] / (epochs * steps_per_epoch))
        return min(1.0, (time.time() - t0) / (minutes * 60))

    def lr_factor(step: int) -> float:  # warmup; then constant, or (cosine) a cosine to zero over the budget
        cosine = 0.5 * (1 + math.cos(math.pi * done_share())) if spec.get("cosine") else 1.0
        return min(1.0, (step + 1) / 50) * cosine

    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    # Optional weights per code level in the training loss (validation stays unweighted): the first
    # levels decide which beams survive, yet they are learned least (bench/RESULTS.md).
    level_weights = torch.tensor(spec.get("level_weights", [1.0] * levels))

    def loss_of(ids, labels, mask, pos, weighted=False):
        logits = model(inputs_embeds=embed(ids), attention_mask=mask, position_ids=pos).logits[:, :-1]
        target = labels[:, 1:].reshape(-1)
        per_token = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target, ignore_index=-100, reduction="none"
        )
        if weighted:
            level = ((target - FIRST_CODE) // per_level).clamp(0, levels - 1)
            per_token = per_token * torch.where(target >= FIRST_CODE, level_weights[level], 1.0)
        return per_token.sum(), (target != -100).sum()

    def forward(ids, mask, position, cache, keep):
        return model(
            inputs_embeds=embed(ids),
            attention_mask=mask,
            position_ids=position,
            **{CACHE_ARG: cache},
            use_cache=True,
            logits_to_keep=keep,
        ).logits

    trie = CodeTrie(codes.values())

    def score() -> tuple[list, list, list]:
        """Each test user's rank of the target in the beams, in the beams without the user's
        own items (a recommender does not offer what the user already has; in these blocks no
        user ever reviews an item twice), and how many own items the top 10 held."""
        ranks, fresh_ranks, history_in_top10 = [], [], []
        with torch.no_grad():
            for k in range(0, len(users), 64):
                part = users[k : k + 64]
                prompts = [prompt(s["history"]) + ([] if objective == "sequence" else [EOS]) for s in part]
                seqs, _ = constrained_beam_search(forward, prompts, trie, levels, beams, PAD, "cpu")
                for i, s in enumerate(part):
                    found = [tuple(seqs[i, j].tolist()) for j in range(beams)]
                    had = {tuple(codes[h]) for h in s["history"]}
                    fresh = [c for c in found if c not in had]
                    target = tuple(codes[s["target"]])
                    ranks.append(found.index(target) if target in found else None)
                    fresh_ranks.append(fresh.index(target) if target in fresh[:10] else None)
                    history_in_top10.append(sum(c in had for c in found[:10]))
        return ranks, fresh_ranks, history_in_top10

    epoch, best, best_state, targets = 0, math.inf, None, 0
    by_epoch = {}
    while (epoch < epochs) if epochs else (time.time() - t0 < minutes * 60):
        model.train()
        order = list(range(len(examples)))
        random.Random(epoch if seed == 0 else f"{seed}/{epoch}").shuffle(order)
        for k in range(0, len(order), 32):
            total, count = loss_of(*batch([examples[j] for j in order[k : k + 32]]), weighted=True)
            opt.zero_grad()
            (total / count).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt_steps[0] += 1
            warmup.step()
            targets += int(count) // levels
            if not epochs and time.time() - t0 > minutes * 60:
                break
        model.eval()
        with torch.no_grad():
            sums = [loss_of(*batch(valid[k : k + 256])) for k in range(0, len(valid), 256)]
        # per code token (EOS excluded), so both objectives compare
        val = (
            sum(float(s) for s, _ in sums)
            / sum(int(n) for _, n in sums)
            * (levels + (objective == "response"))
            / levels
        )
        if val < best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
        epoch += 1
        if epoch in (eval_epochs or ()):  # does ranking follow the validation loss?
            ranked = rank_metrics(score()[0], [10])
            by_epoch[epoch] = {"val_loss": round(val, 4), "ndcg@10": round(ranked["ndcg@10"], 4)}
    train_minutes = (time.time() - t0) / 60
    model.load_state_dict(best_state)
    model.eval()
    ranks, fresh_ranks, history_in_top10 = score()

    counts: dict = {}
    for s in train:
        counts[tuple(codes[s["target"]])] = counts.get(tuple(codes[s["target"]]), 0) + 1
    by_count = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    top = by_count[:10]
    popular = [top.index(tuple(codes[s["target"]])) if tuple(codes[s["target"]]) in top else None for s in users]
    popular_fresh = []
    for s in users:
        had = {tuple(codes[h]) for h in s["history"]}
        mine = [c for c in by_count[:40] if c not in had][:10]
        target = tuple(codes[s["target"]])
        popular_fresh.append(mine.index(target) if target in mine else None)
    transitions = transition_ranks(train, users, codes, top)
    m, p, t = rank_metrics(ranks, [10]), rank_metrics(popular, [10]), rank_metrics(transitions, [10])
    return {
        "variant": name,
        "parameters": params,
        "epochs": epoch,
        "train_minutes": round(train_minutes, 1),
        "targets_trained": targets,
        "users": len(users),
        "best_val_loss_per_code_token": round(best, 4),
        "ndcg@10": round(m["ndcg@10"], 4),
        "hit@10": round(m["hit@10"], 4),
        "excluding_history": {
            "ndcg@10": round(rank_metrics(fresh_ranks, [10])["ndcg@10"], 4),
            "hit@10": round(rank_metrics(fresh_ranks, [10])["hit@10"], 4),
            "popularity_ndcg@10": round(rank_metrics(popular_fresh, [10])["ndcg@10"], 4),
            "history_items_in_top10_per_user": round(sum(history_in_top10) / len(users), 3),
        },
        "by_epoch": by_epoch,
        "popularity_ndcg@10": round(p["ndcg@10"], 4),
        "popularity_hit@10": round(p["hit@10"], 4),
        "transitions_ndcg@10": round(t["ndcg@10"], 4),
        "transitions_hit@10": round(t["hit@10"], 4),
    }


def transition_ranks(train: list, users: list, codes: dict, top: list) -> list:
    """A non-neural reference stronger than popularity: the items that followed each of the
    user's last three items in the training targets (weights 1, 1/2, 1/3, most recent first),
    then the most popular items; the rank of the test target's codes in that top 10, or None."""
    following: dict = {}
    for s in train:
        if s["history"]:
            after = following.setdefault(s["history"][-1], {})
            after[tuple(codes[s["target"]])] = after.get(tuple(codes[s["target"]]), 0) + 1
    ranks = []
    for s in users:
        score: dict = {}
        for age, item in enumerate(reversed(s["history"][-3:])):
            for c, n in following.get(item, {}).items():
                score[c] = score.get(c, 0.0) + n / (age + 1)
        ranked = [c for c, _ in sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:10]]
        ranked += [c for c in top if c not in ranked][: 10 - len(ranked)]
        target = tuple(codes[s["target"]])
        ranks.append(ranked.index(target) if target in ranked else None)
    return ranks


def main() -> None:
    from data_tools.help_format import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--minutes", type=float, default=12.0, help="training time per variant (one core)")
    ap.add_argument(
        "--epochs",
        type=int,
        help="train this many epochs instead of --minutes (figures that other "
        "load on the cores cannot bias; cosine variants decay over them)",
    )
    ap.add_argument(
        "--eval-epochs",
        type=int,
        nargs="*",
        default=[],
        help="also score the test users after these epochs (ranking against validation loss)",
    )
    ap.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    ap.add_argument("--data", help="a dataset folder with an item index (default: the CDs blocks, converted here)")
    ap.add_argument("--window", type=int, default=0, help="the window trained on and evaluated")
    ap.add_argument("--users", type=int, default=None, help="a seeded sample of the test users (default: all)")
    ap.add_argument("--beams", type=int, default=10, help="beams of the evaluation's beam search")
    ap.add_argument(
        "--variants",
        nargs="*",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        metavar="VARIANT",
        help="variants to train, by their names in VARIANTS above (default: all)",
    )
    ap.add_argument("--work", default="/tmp/peso-cpu-models", help="where the data and the results go")
    a = ap.parse_args()
    data = a.data
    if data is None:
        from data_tools.convert import convert_blocks

        data = convert_blocks(CDS, os.path.join(a.work, "cds"))
    with ProcessPoolExecutor(2) as pool:
        n = len(a.variants)
        results = list(
            pool.map(
                run_variant,
                a.variants,
                [VARIANTS[v] for v in a.variants],
                [data] * n,
                [a.window] * n,
                [a.minutes] * n,
                [a.users] * n,
                [a.beams] * n,
                [a.epochs] * n,
                [a.eval_epochs] * n,
                [a.seed] * n,
            )
        )
    print(
        json.dumps(
            {
                "bench": "cpu_models",
                "minutes_per_variant": None if a.epochs else a.minutes,
                "epochs": a.epochs,
                "window": a.window,
                "beams": a.beams,
                "seed": a.seed,
                "results": results,
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
