"""Evaluation: batched beam search constrained by the prefix trie of real item codes, Hit@K and
NDCG@K overall and by user group, and the test loss, per window, for the R[i][j] matrix of
forgetting; beside them, two references scored on the same users: the window's most popular
items (its most frequent training targets), which a recommender must beat, and a stronger one
that needs no model: the items that followed the user's last items among the window's training
targets (then the popular ones), which shows how much item-to-item signal the window holds and
how much of it the model has learned. `eval.max_users` takes a
seeded random sample of a window's test users, the same for every method, period and rank count.

Decoding: the prompt runs once; its KV cache is shared by the user's beams (a 4D attention mask
lets each beam see its prompt and its own earlier tokens); then one token per code
level, each step's candidates restricted to the continuations the trie allows after the beam's
prefix. So every output is a real item (the count of invalid outputs is reported and must be
0). Beams that cannot continue (fewer valid continuations than beams, or an empty allowed set)
score -inf and never rank. A prediction is a hit when its code equals the target's code.

Under ZeRO-3 every forward is a collective, so every rank runs the same number of batches of the
same number of steps: ranks pad with masked copies that count for nothing.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter, defaultdict

import torch
from transformers import DynamicCache

from data_tools.dataset import atomic_write_bytes, atomic_write_json
from data_tools.progress import progress_bar
from data_tools.reader import read_split, split_size
from data_tools.windows import GROUPS
from train.data import collate
from train.loss import IGNORE, lm_loss
from train.metrics import Pace

log = logging.getLogger(__name__)

NEG = float("-inf")
REPORT_EVERY_S = 60.0  # without a terminal: one progress line per minute of a window's evaluation


def rank_metrics(ranks: list[int | None], ks: list[int]) -> dict[str, float]:
    """Mean Hit@K and NDCG@K over users, from each user's 0-based rank of the target (None = not
    in the returned list). NDCG with one relevant item: 1 / log2(rank + 2) if rank < K."""
    n = len(ranks)
    out = {}
    for k in ks:
        hits = [r is not None and r < k for r in ranks]
        out[f"hit@{k}"] = sum(hits) / n if n else 0.0
        out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 2) for r in ranks if r is not None and r < k) / n if n else 0.0
    return out


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax, with -inf (not NaN) for a row whose logits are all -inf."""
    return torch.log_softmax(logits.float(), -1).nan_to_num(nan=NEG)


@torch.no_grad()
def constrained_beam_search(
    forward,
    prompts: list[list[int]],
    trie,
    levels: int,
    beams: int,
    pad_id: int,
    device,
    shared_prompt: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top `beams` code sequences per prompt: (tokens [B, beams, levels], log-prob scores [B, beams]).

    `forward(input_ids, attention_mask, position_ids, cache, keep)` returns the logits of the last
    `keep` input positions, [N, keep, V]; `attention_mask` is 2D [N, seen + new] or, for the
    decoding steps of the shared-prompt search, an additive float 4D mask [N, 1, new, seen + new].

    `shared_prompt` (the default): the B prompts run once, and their KV cache (B rows, not
    B*beams) is shared by the beams of each user; each decoding step feeds the beams' newest
    tokens as one row of `beams` query positions per user, whose 4D mask lets each beam attend
    to its prompt and to its own ancestors' tokens among the cached generated ones (a tree of
    beams: no copy of the prompt cache per beam, no reorder). It needs an attention that takes
    a 4D mask (sdpa, eager). `shared_prompt=False`: the cache is repeated for the beams and
    reordered at each step (for flash_attention_2), one query position per beam."""
    b = len(prompts)  # B
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = forward(ids, mask, position, cache, 1)[:, -1]  # [B, V]
    vocab_size = logits.shape[-1]
    logp = _log_probs(logits)
    logp = logp.masked_fill(~trie.allowed_mask([()] * b, vocab_size).to(device), NEG)
    scores, tokens = logp.topk(beams, dim=-1)  # [B, beams]; -inf when fewer continuations exist
    seqs = tokens.unsqueeze(-1)  # [B, beams, 1]
    last_pos = position[:, -1:]  # [B, 1]
    if shared_prompt:
        # Bool [B, beams, keys] of what each beam's newest token may attend to: its prompt (the
        # left padding excluded), then the generated tokens fed so far, one block of `beams` per
        # step, of which a beam sees its ancestors' (one per block) and its own.
        layers = getattr(cache, "layers", None)
        dtype = layers[0].keys.dtype if layers and layers[0].keys is not None else logits.dtype  # the queries'
        sees = mask.bool().unsqueeze(1).expand(b, beams, width)
        eye = torch.eye(beams, dtype=torch.bool, device=device).expand(b, beams, beams)
    else:
        cache.batch_repeat_interleave(beams)
        mask = mask.repeat_interleave(beams, 0)
        last_pos = last_pos.repeat_interleave(beams, 0)
    for step in range(1, levels):
        flat = seqs.reshape(b * beams, step)
        if shared_prompt:
            sees = torch.cat([sees, eye], -1)
            bias = torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill_(~sees, torch.finfo(dtype).min)
            position = (last_pos + step).expand(b, beams)
            logits = forward(seqs[:, :, -1], bias.unsqueeze(1), position, cache, beams).reshape(b * beams, -1)
        else:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits = forward(flat[:, -1:], mask, last_pos + step, cache, 1)[:, -1]  # [B*beams, V]
        logp = _log_probs(logits)
        allowed = trie.allowed_mask([tuple(s) for s in flat.tolist()], vocab_size).to(device)
        cand = (scores.reshape(-1, 1) + logp).masked_fill(~allowed, NEG)  # dead beams stay -inf
        scores, idx = cand.reshape(b, beams * vocab_size).topk(beams, dim=-1)
        parent, token = idx // vocab_size, idx % vocab_size
        seqs = torch.cat([seqs.gather(1, parent.unsqueeze(-1).expand(-1, -1, step)), token.unsqueeze(-1)], -1)
        if step < levels - 1:  # after the last level the cache is not read again
            if shared_prompt:  # a new beam sees what its parent saw (its parent's token included)
                sees = sees.gather(1, parent.unsqueeze(-1).expand(-1, -1, sees.shape[-1]))
            else:  # a full copy of the cache
                cache.reorder_cache((parent + torch.arange(b, device=device).unsqueeze(1) * beams).reshape(-1))
    return seqs, scores


def test_users(root: str, manifest: dict, window: int, max_users: int | None, seed: int) -> list[dict]:
    """The test samples (one per user) that evaluation scores in a window: all of them, or a
    seeded random sample of `max_users` (the same for every period, method and rank count, so
    runs compare on the same users; a first-N cut would drop the newest users)."""
    users = read_split(root, window, "test", manifest)
    if max_users is not None and max_users < len(users):
        users = random.Random(f"{seed}/{window}").sample(users, max_users)
    return users


def popular_codes(root: str, manifest: dict, window: int, codebook, k: int) -> list[tuple]:
    """The reference a recommender must beat: the `k` most frequent codes among the window's
    training targets (by count, then code). Codes, not items, because a prediction is scored by
    its code (items that share one count as one)."""
    counts = Counter(tuple(codebook.item_token_ids(s["target"])) for s in read_split(root, window, "train", manifest))
    return [code for code, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


TRANSITION_HISTORY = 3  # the user's last items whose followers the transitions reference counts


def following_codes(root: str, manifest: dict, window: int, codebook) -> dict[int, Counter]:
    """For the transitions reference: item -> how often each code followed it as the next
    training target of the window (a user's consecutive items)."""
    following: dict[int, Counter] = defaultdict(Counter)
    for sample in read_split(root, window, "train", manifest):
        if sample["history"]:
            following[sample["history"][-1]][tuple(codebook.item_token_ids(sample["target"]))] += 1
    return following


def transition_top(following: dict[int, Counter], history: list[int], popular: list[tuple], k: int) -> list[tuple]:
    """The transitions reference's top `k` codes for one user: the codes that followed the last
    TRANSITION_HISTORY items of `history` (weights 1, 1/2, 1/3, most recent first; ties by code),
    then the most popular codes not already listed."""
    score: Counter = Counter()
    for age, item in enumerate(reversed(history[-TRANSITION_HISTORY:])):
        for code, count in following.get(item, {}).items():
            score[code] += count / (age + 1)
    top = [code for code, _ in sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
    return top + [code for code in popular if code not in top][: k - len(top)]


class EvalProgress:
    """How far a window's evaluation is, in users: a bar on a terminal; in a log file (no
    terminal, or logging.progress false), a line every REPORT_EVERY_S seconds, so a long
    evaluation is not mistaken for a hung job. Counted by this rank's batches (ranks share the
    users evenly)."""

    def __init__(self, window: int, users: int, batches: int, show_bar: bool):
        self.window, self.users, self.batches = window, users, batches
        self.bar = progress_bar(total=users, desc=f"evaluating window {window}", unit="user", enabled=show_bar)
        self.pace = Pace(0, batches)
        self.next_report = REPORT_EVERY_S

    def batch_done(self, k: int) -> None:
        """Batch `k` (0-based) of this rank is done."""
        done = min(self.users, round((k + 1) / self.batches * self.users))
        self.bar.update(done - self.bar.n)
        if self.bar.disable and self.pace.elapsed() >= self.next_report:
            log.info(f"evaluating window {self.window}: {done:,} of {self.users:,} users, {self.pace.summary(k + 1)}")
            self.next_report += REPORT_EVERY_S

    def close(self) -> None:
        self.bar.close()


class Evaluator:
    """The evaluation of one period's model, built once per period: after period i, the test sets
    of windows 0..i (row i of R), written to metrics.json; and each of window i's test users' top
    items (internal item ids, best first, with their beam log-probabilities and the target's rank)
    to recommendations.jsonl."""

    def __init__(self, *, cfg, strategy, engine, encoder, manifest: dict, period: int, run, logger):
        self.cfg, self.strategy, self.engine, self.encoder = cfg, strategy, engine, encoder
        self.manifest, self.period, self.run, self.logger = manifest, period, run, logger

    def _forward(self, ids, mask, position, cache, keep):
        out = self.engine(
            input_ids=ids, attention_mask=mask, position_ids=position, cache=cache, use_cache=True, logits_to_keep=keep
        )
        return out.logits

    def evaluate_window(self, window: int) -> dict:
        """One window's test users (all, or the seeded sample of eval.max_users), shared round-robin
        by the ranks, combined across ranks; with the popularity reference on the same users."""
        cfg, strategy, engine, encoder = self.cfg, self.strategy, self.engine, self.encoder
        users = test_users(cfg.data.path, self.manifest, window, cfg.eval.max_users, cfg.eval.seed)
        samples = users[strategy.rank :: strategy.world_size]
        per_rank = math.ceil(len(users) / strategy.world_size)
        batch_size = cfg.data.eval_batch_size
        batches = math.ceil(per_rank / batch_size)
        codebook = encoder.codebook
        beams = cfg.eval.beams
        popular = popular_codes(cfg.data.path, self.manifest, window, codebook, max(cfg.eval.ks))
        following = following_codes(cfg.data.path, self.manifest, window, codebook)
        pad_id = encoder.tokenizer.pad_token_id

        ranks, popularity_ranks, transition_ranks, groups, invalid, lists = [], [], [], [], 0, []
        loss_sum = loss_count = 0.0
        engine.eval()
        dummy = encoder.prompt([0])
        masked = encoder.target([0], 0)
        masked = {"input_ids": masked["input_ids"], "labels": [IGNORE] * len(masked["labels"])}
        progress = EvalProgress(window, len(users), batches, strategy.is_rank0 and cfg.logging.progress)
        for k in range(batches):
            chunk = samples[k * batch_size : (k + 1) * batch_size]
            prompts = [encoder.prompt(sample["history"]) for sample in chunk]
            prompts += [dummy] * (batch_size - len(prompts))  # padding for the collective: results ignored
            seqs, scores = constrained_beam_search(
                self._forward,
                prompts,
                codebook.trie,
                codebook.levels,
                beams,
                pad_id,
                strategy.device,
                shared_prompt=cfg.model.attn_implementation != "flash_attention_2",  # no 4D masks there
            )
            # The test loss (cross-entropy of the target's tokens, teacher-forced): a finer signal of
            # forgetting than the hit rates.
            examples = [encoder.target(sample["history"], sample["target"]) for sample in chunk]
            examples += [masked] * (batch_size - len(examples))
            with torch.no_grad():
                total, count = lm_loss(engine, strategy.to_device(collate(examples, pad_id)), cfg.method.temperature)
            loss_sum += float(total)
            loss_count += float(count)
            for i, sample in enumerate(chunk):
                target = tuple(codebook.item_token_ids(sample["target"]))
                rank = None
                items, item_scores = [], []
                for j in range(beams):
                    if scores[i, j] == NEG:
                        continue
                    code = tuple(seqs[i, j].tolist())
                    item = codebook.item_of(code)
                    if item is None:
                        invalid += 1
                        continue
                    if code == target and rank is None:
                        rank = len(items)
                    items.append(item)
                    item_scores.append(round(float(scores[i, j]), 6))
                ranks.append(rank)
                lists.append(
                    {
                        "user": sample["user"],
                        "group": sample["group"],
                        "target": sample["target"],
                        "rank": rank,
                        "items": items,
                        "scores": item_scores,
                    }
                )
                popularity_ranks.append(popular.index(target) if target in popular else None)
                followers = transition_top(following, sample["history"], popular, max(cfg.eval.ks))
                transition_ranks.append(followers.index(target) if target in followers else None)
                groups.append(sample["group"])
            progress.batch_done(k)
        progress.close()
        engine.train()
        out = self._combine(ranks, groups, invalid)
        reference = self._combine(popularity_ranks, groups, 0)
        out["popularity"] = {"overall": reference["overall"], "groups": reference["groups"]}
        reference = self._combine(transition_ranks, groups, 0)
        out["transitions"] = {"overall": reference["overall"], "groups": reference["groups"]}
        out["recommendations"] = lists  # this rank's users; `evaluate` gathers the current window's
        out["users_in_window"] = split_size(cfg.data.path, window, "test", self.manifest)
        loss_sum, loss_count = strategy.all_reduce_sum([loss_sum, loss_count])
        out["overall"]["test_loss"] = loss_sum / max(loss_count, 1.0)
        return out

    def _combine(self, ranks: list, groups: list, invalid: int) -> dict:
        """Sum hits, NDCG and counts across ranks (overall and per group), then average."""
        ks = self.cfg.eval.ks
        keys = [f"{metric}@{k}" for k in ks for metric in ("hit", "ndcg")]
        sums = []
        for group in [None] + list(GROUPS):  # None: every user
            chosen = [r for r, g in zip(ranks, groups) if group is None or g == group]
            metrics = rank_metrics(chosen, ks)
            sums += [len(chosen)] + [metrics[key] * len(chosen) for key in keys]
        sums.append(invalid)
        total = self.strategy.all_reduce_sum(sums)
        out, pos = {}, 0
        for group in [None] + list(GROUPS):
            users = total[pos]
            vals = {key: (total[pos + 1 + i] / users if users else 0.0) for i, key in enumerate(keys)}
            pos += 1 + len(keys)
            if group is None:
                out["users"], out["overall"] = int(users), vals
            else:
                out.setdefault("groups", {})[group] = {"users": int(users), **vals}
        out["invalid_outputs"] = int(total[pos])
        return out

    def evaluate(self, *, step: int) -> dict:
        """Windows 0..period, written to the period's metrics.json and recommendations.jsonl and to
        TensorBoard at `step`; returns metrics.json's content."""
        cfg, strategy, period = self.cfg, self.strategy, self.period
        windows, recommendations = {}, None
        for j in range(period + 1):
            if self.manifest["windows"][j]["stats"]["samples"]["test"] == 0:
                continue
            windows[str(j)] = self.evaluate_window(j)
            lists = windows[str(j)].pop("recommendations")
            if j == period:
                recommendations = strategy.gather_to_rank0(lists)
            if windows[str(j)]["invalid_outputs"]:
                raise RuntimeError(
                    f"constrained decoding produced {windows[str(j)]['invalid_outputs']} invalid items in window {j}"
                )
        current = windows.get(str(period))
        result = {
            "period": period,
            "method": cfg.method.name,
            "ks": cfg.eval.ks,
            "windows": windows,
            "overall": current["overall"] if current else {},
            "groups": current["groups"] if current else {},
        }
        if strategy.is_rank0:
            self._write(result, recommendations, step)
        return result

    def _write(self, result: dict, recommendations: list | None, step: int) -> None:
        """Rank 0: metrics.json, recommendations.jsonl, the eval/* scalars and the log lines."""
        period, logger, windows = self.period, self.logger, result["windows"]
        current = windows.get(str(period))
        atomic_write_json(self.run.metrics_path(period), result)
        if recommendations is not None:
            rows = sorted((r for part in recommendations for r in part), key=lambda r: r["user"])
            atomic_write_bytes(
                self.run.recommendations_path(period), "".join(json.dumps(r) + "\n" for r in rows).encode()
            )
        for j, w in windows.items():
            logger.scalars({f"eval/window{j}/{k}": v for k, v in w["overall"].items()}, step)
        if current:
            logger.scalars({f"eval/current/{k}": v for k, v in current["overall"].items()}, step)
            for g, vals in current["groups"].items():
                logger.scalars({f"eval/current_{g}/{k}": v for k, v in vals.items() if k != "users"}, step)
        log.info(
            f"period {period} test (window {period}, {current['users'] if current else 0} users): "
            + ", ".join(f"{k} {v:.4f}" for k, v in result["overall"].items())
        )
        if current:
            log.info(
                "   most popular items of the window (reference): "
                + ", ".join(f"{k} {v:.4f}" for k, v in current["popularity"]["overall"].items())
            )
            log.info(
                "   items that followed the users' last items (reference, no model): "
                + ", ".join(f"{k} {v:.4f}" for k, v in current["transitions"]["overall"].items())
            )
