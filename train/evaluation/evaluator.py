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
same number of steps: ranks pad with masked copies that count for nothing. Where the whole model
fits a rank's device, `eval.replica` evaluates with a plain copy per rank built from the period's
export instead (no collective inside the forward; docs/zero3.md, "Evaluating with a replica").

What each rank reads: its own users' test samples only; rank 0 also reads the window's training
split once (both references) and every evaluated user's test sample, and scores the references
for all of them, while the other ranks compute only the model's metrics. The device is read back
once per batch (the beams' codes and scores), the test loss once per window, and the trie's masks
are built on the device (`DeviceTrie`, data_tools/index/trie.py).

A stop request (train/dist/stop.py) is honoured before any batch; each finished window is kept in
`periods/<t>/eval/window-<j>.json` (rank 0, atomically), so a rerun evaluates only the windows
left, as long as the export and the evaluation's settings are those the file was computed with.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter, defaultdict

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

from data_tools.atomic import atomic_write_bytes, atomic_write_json
from data_tools.progress import progress_bar
from data_tools.reader import iter_split, read_samples_at, split_size
from data_tools.windows import GROUPS
from train.evaluation.replica import build_replica, release_memory, use_replica
from train.evaluation.windows import FinishedWindows
from train.loop.data import collate
from train.loop.loss import IGNORE, lm_loss
from train.loop.telemetry import Pace
from train.model.build import DTYPES

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


# transformers names a forward's KV cache `cache` from 5.24 on; earlier releases call it
# `past_key_values` and ignore `cache` without a word (the search would then decode from an empty
# cache). Later ones still take `past_key_values`, with a warning, until 5.40.
CACHE_ARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def decoding_forward(model):
    """The `forward` that constrained_beam_search calls, for a Hugging Face causal LM (or a
    DeepSpeed engine around one): the logits of the last `keep` positions, with the KV cache."""

    def forward(ids, mask, position, cache, keep):
        kwargs = {CACHE_ARG: cache}
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=keep, **kwargs
        )
        return out.logits

    return forward


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
    trie_masks: str = "device",
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
    reordered at each step (for flash_attention_2), one query position per beam.

    `trie` is a CodeTrie; `trie_masks` "device" (the default) builds each step's mask on `device`
    from the trie's tensors (`trie.on(device)`), "host" as before: from the beams' prefixes read
    back to the host, then copied over (kept to measure the difference: bench/eval.py). Both
    give the same masks, so the same sequences and scores."""
    if trie_masks not in ("device", "host"):
        raise ValueError(f"trie_masks must be device or host, not {trie_masks!r}")
    masks = trie.on(device) if trie_masks == "device" else trie
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
    root = torch.zeros((b, 0), dtype=torch.long, device=device)  # no token generated yet
    logp = logp.masked_fill(~masks.allowed_mask(root, vocab_size, device), NEG)
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
        allowed = masks.allowed_mask(flat, vocab_size, device)
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


def decode_batch(
    forward,
    prompts: list[list[int]],
    codebook,
    beams: int,
    pad_id: int,
    device,
    shared_prompt: bool = True,
    trie_masks: str = "device",
    users: int | None = None,
) -> tuple[list[list[list[int]]], list[list[float]]]:
    """The evaluation's decoding of one batch: the constrained beam search, then the codes and
    scores of the first `users` prompts (the rest are padding) read back to the host at once,
    as lists [users][beams] (one transfer per tensor, not one per beam)."""
    seqs, scores = constrained_beam_search(
        forward, prompts, codebook.trie, codebook.levels, beams, pad_id, device, shared_prompt, trie_masks
    )
    users = len(prompts) if users is None else users
    return seqs[:users].tolist(), scores[:users].tolist()


def test_indices(n: int, max_users: int | None, seed: int, window: int) -> list[int]:
    """The positions (in the test split's stored order) of the test samples that evaluation scores
    in a window, in the order they are shared out to the ranks: all of them, or a seeded random
    sample of `max_users` (the same for every period, method and rank count, so runs compare on
    the same users; a first-N cut would drop the newest users). `random.sample` draws its
    positions from the population's length and k alone, so sampling range(n) picks exactly the
    users that sampling the list of samples did (what this function replaced: results stay
    comparable with earlier runs)."""
    if max_users is not None and max_users < n:
        return random.Random(f"{seed}/{window}").sample(range(n), max_users)
    return list(range(n))


def read_test_samples(root: str, manifest: dict, window: int, indices: list[int]) -> list[dict]:
    """The test samples at `indices`, in that order; only their shards are read."""
    found = dict(read_samples_at(root, window, "test", set(indices), manifest))
    return [found[i] for i in indices]


def test_users(root: str, manifest: dict, window: int, max_users: int | None, seed: int) -> list[dict]:
    """The test samples (one per user) that evaluation scores in a window (`test_indices`)."""
    n = split_size(root, window, "test", manifest)
    return read_test_samples(root, manifest, window, test_indices(n, max_users, seed, window))


TRANSITION_HISTORY = 3  # the user's last items whose followers the transitions reference counts


def window_references(root: str, manifest: dict, window: int, codebook, k: int) -> tuple[list[tuple], dict]:
    """Both references' tables, from one pass over the window's training split:
    - the reference a recommender must beat: the `k` most frequent codes among the window's
      training targets (by count, then code). Codes, not items, because a prediction is scored
      by its code (items that share one count as one);
    - for the transitions reference: item -> how often each code followed it as the next
      training target of the window (a user's consecutive items)."""
    counts: Counter = Counter()
    following: dict[int, Counter] = defaultdict(Counter)
    for sample in iter_split(root, window, "train", manifest):
        code = tuple(codebook.item_token_ids(sample["target"]))
        counts[code] += 1
        if sample["history"]:
            following[sample["history"][-1]][code] += 1
    popular = [code for code, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
    return popular, following


def popular_codes(root: str, manifest: dict, window: int, codebook, k: int) -> list[tuple]:
    """The `k` most frequent codes among the window's training targets (`window_references`)."""
    return window_references(root, manifest, window, codebook, k)[0]


def following_codes(root: str, manifest: dict, window: int, codebook) -> dict[int, Counter]:
    """Item -> how often each code followed it as the next training target (`window_references`)."""
    return window_references(root, manifest, window, codebook, 0)[1]


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
    to recommendations.jsonl.

    `stop`: a StopRequest (train/dist/stop.py), checked before every batch (a collective: every rank
    runs the same number of batches); `dtype`: the run's compute dtype (a replica's);
    `reuse_windows`: take the windows a stopped evaluation of the same export finished from
    their files (False with --eval_only, which evaluates from scratch)."""

    def __init__(
        self,
        *,
        cfg,
        strategy,
        engine,
        encoder,
        manifest: dict,
        period: int,
        run,
        logger,
        stop=None,
        dtype: str | torch.dtype | None = None,
        reuse_windows: bool = True,
    ):
        self.cfg, self.strategy, self.engine, self.encoder = cfg, strategy, engine, encoder
        self.manifest, self.period, self.run, self.logger = manifest, period, run, logger
        self.stop, self.reuse_windows = stop, reuse_windows
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or _float_dtype(engine)
        self.model = engine  # what the forwards run: the engine, or a replica inside `evaluate`

    def _forward(self, ids, mask, position, cache, keep):
        return decoding_forward(self.model)(ids, mask, position, cache, keep)

    # ---- one window ---------------------------------------------------------------------------

    def evaluate_window(self, window: int) -> dict:
        """One window's test users (all, or the seeded sample of eval.max_users), shared round-robin
        by the ranks, combined across ranks; with both references on the same users."""
        cfg, strategy, encoder = self.cfg, self.strategy, self.encoder
        chosen = test_indices(
            split_size(cfg.data.path, window, "test", self.manifest), cfg.eval.max_users, cfg.eval.seed, window
        )
        per_rank = math.ceil(len(chosen) / strategy.world_size)
        batch_size = cfg.data.eval_batch_size
        batches = math.ceil(per_rank / batch_size)
        codebook = encoder.codebook
        beams = cfg.eval.beams
        pad_id = encoder.tokenizer.pad_token_id
        log.info(f"period {self.period}: evaluating window {window} ({len(chosen):,} users)")
        if strategy.is_rank0:  # its own users, and both references for everyone
            samples, references = self._references(window, chosen)
        else:
            samples = read_test_samples(
                cfg.data.path, self.manifest, window, chosen[strategy.rank :: strategy.world_size]
            )
            references = None

        ranks, groups, invalid, lists = [], [], 0, []
        # Summed on the device (float64, as the host's floats were), read once at the window's end.
        loss_sum = torch.zeros((), dtype=torch.float64, device=strategy.device)
        loss_count = torch.zeros((), dtype=torch.float64, device=strategy.device)
        model = self.model
        model.eval()
        dummy = encoder.prompt([0])
        masked = encoder.target([0], 0)
        masked = {"input_ids": masked["input_ids"], "labels": [IGNORE] * len(masked["labels"])}
        progress = EvalProgress(window, len(chosen), batches, strategy.is_rank0 and cfg.logging.progress)
        try:
            for k in range(batches):
                self._stop_point(window, k)
                chunk = samples[k * batch_size : (k + 1) * batch_size]
                prompts = [encoder.prompt(sample["history"]) for sample in chunk]
                prompts += [dummy] * (batch_size - len(prompts))  # padding for the collective: results ignored
                codes, values = decode_batch(
                    self._forward,
                    prompts,
                    codebook,
                    beams,
                    pad_id,
                    strategy.device,
                    shared_prompt=cfg.model.attn_implementation != "flash_attention_2",  # no 4D masks there
                    users=len(chunk),
                )
                # The test loss (cross-entropy of the target's tokens, teacher-forced): a finer signal
                # of forgetting than the hit rates.
                examples = [encoder.target(sample["history"], sample["target"]) for sample in chunk]
                examples += [masked] * (batch_size - len(examples))
                with torch.no_grad():
                    total, count = lm_loss(model, strategy.to_device(collate(examples, pad_id)), cfg.method.temperature)
                loss_sum += total
                loss_count += count
                for i, sample in enumerate(chunk):
                    target = tuple(codebook.item_token_ids(sample["target"]))
                    rank = None
                    items, item_scores = [], []
                    for code, score in zip(codes[i], values[i]):
                        if score == NEG:
                            continue
                        item = codebook.item_of(tuple(code))
                        if item is None:
                            invalid += 1
                            continue
                        if tuple(code) == target and rank is None:
                            rank = len(items)
                        items.append(item)
                        item_scores.append(round(score, 6))
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
                    groups.append(sample["group"])
                progress.batch_done(k)
        finally:
            progress.close()
            if model is self.engine:
                self.engine.train()
        out = self._combine(self._sums(ranks, groups, invalid))
        references = strategy.broadcast_object(references)  # each rank adds its own users' share
        for name in ("popularity", "transitions"):
            reference = self._combine(references[name][strategy.rank])
            out[name] = {"overall": reference["overall"], "groups": reference["groups"]}
        out["recommendations"] = lists  # this rank's users; `evaluate` gathers the current window's
        out["users_in_window"] = split_size(cfg.data.path, window, "test", self.manifest)
        loss_sum, loss_count = strategy.all_reduce_sum([float(loss_sum), float(loss_count)])
        out["overall"]["test_loss"] = loss_sum / max(loss_count, 1.0)
        return out

    def _references(self, window: int, chosen: list[int]) -> tuple[list[dict], dict]:
        """Rank 0: its own users' test samples, and both references scored for every evaluated
        user from one pass over the training split and one over the chosen test samples. The
        references come as the sums each rank adds to the window's totals for its own users
        (`_sums` of its round-robin share), so the totals are exactly those of every rank scoring
        its own users."""
        cfg, world = self.cfg, self.strategy.world_size
        codebook, k = self.encoder.codebook, max(cfg.eval.ks)
        popular, following = window_references(cfg.data.path, self.manifest, window, codebook, k)
        position = {index: p for p, index in enumerate(chosen)}
        popularity, transitions, groups = [None] * len(chosen), [None] * len(chosen), [None] * len(chosen)
        own = {}
        for index, sample in read_samples_at(cfg.data.path, window, "test", set(chosen), self.manifest):
            p = position[index]
            target = tuple(codebook.item_token_ids(sample["target"]))
            popularity[p] = popular.index(target) if target in popular else None
            followers = transition_top(following, sample["history"], popular, k)
            transitions[p] = followers.index(target) if target in followers else None
            groups[p] = sample["group"]
            if p % world == 0:
                own[p] = sample
        sums = {
            name: [self._sums(ranks[r::world], groups[r::world], 0) for r in range(world)]
            for name, ranks in (("popularity", popularity), ("transitions", transitions))
        }
        return [own[p] for p in range(0, len(chosen), world)], sums

    def _sums(self, ranks: list, groups: list, invalid: int) -> list[float]:
        """One rank's share of the window's totals: per group (and overall) its users and the sums
        of their hits and NDCG, then its invalid outputs."""
        ks = self.cfg.eval.ks
        keys = [f"{metric}@{k}" for k in ks for metric in ("hit", "ndcg")]
        sums = []
        for group in [None] + list(GROUPS):  # None: every user
            chosen = [r for r, g in zip(ranks, groups) if group is None or g == group]
            metrics = rank_metrics(chosen, ks)
            sums += [len(chosen)] + [metrics[key] * len(chosen) for key in keys]
        sums.append(invalid)
        return sums

    def _combine(self, sums: list[float]) -> dict:
        """Every rank's `_sums` added up across ranks (collective), then averaged."""
        ks = self.cfg.eval.ks
        keys = [f"{metric}@{k}" for k in ks for metric in ("hit", "ndcg")]
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

    def _stop_point(self, window: int, batch: int) -> None:
        """Before each batch: stop if any rank got a stop request (collective). Tests name the
        point "eval:<window>:<batch>" in PESO_FAULT_SIGNAL_AT (train/dist/stop.py) to signal rank 0 there."""
        if self.stop is None:
            return
        self.stop.fault_point(f"eval:{window}:{batch}")
        self.stop.check()

    # ---- windows 0..t -------------------------------------------------------------------------

    def evaluate(self, *, step: int) -> dict:
        """Windows 0..period, written to the period's metrics.json and recommendations.jsonl and to
        TensorBoard at `step`; returns metrics.json's content. Windows that a stopped evaluation
        of the same export finished are taken from their files; StopRequested passes through
        (what is finished is kept)."""
        cfg, strategy, period = self.cfg, self.strategy, self.period
        todo = [j for j in range(period + 1) if self.manifest["windows"][j]["stats"]["samples"]["test"] > 0]
        finished = FinishedWindows(cfg, self.run, period)
        key = finished.key(self.dtype, strategy.world_size) if strategy.is_rank0 else None
        saved = finished.saved(key, todo) if strategy.is_rank0 and self.reuse_windows else {}
        reused = strategy.broadcast_object({j: w["result"] for j, w in saved.items()})
        windows, recommendations = {}, None
        replica = None
        if len(reused) < len(todo) and use_replica(cfg.eval.replica, strategy, self.engine, self.dtype, period):
            replica = build_replica(cfg, self.run, period, len(self.encoder.tokenizer), self.dtype, strategy)
        self.model = replica or self.engine
        try:
            for j in todo:
                if j in reused:
                    log.info(f"period {period}: window {j} was evaluated before a stop; its result is reused")
                    windows[str(j)] = reused[j]
                    if j == period and strategy.is_rank0:
                        recommendations = [saved[j]["recommendations"]]
                    continue
                windows[str(j)] = self.evaluate_window(j)
                lists = windows[str(j)].pop("recommendations")
                if j == period:
                    recommendations = strategy.gather_to_rank0(lists)
                if windows[str(j)]["invalid_outputs"]:
                    raise RuntimeError(
                        f"constrained decoding produced {windows[str(j)]['invalid_outputs']} invalid items in window {j}"
                    )
                if strategy.is_rank0:
                    finished.save(j, key, windows[str(j)], recommendations if j == period else None)
        finally:
            if replica is not None:
                self.model = replica = None
                release_memory(strategy)
            self.model = self.engine
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
            finished.clear()  # metrics.json holds them now
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


def _float_dtype(engine) -> torch.dtype:
    """The dtype of the model's first floating parameter (when no compute dtype is given)."""
    module = getattr(engine, "module", engine)
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
