"""Ranking metrics: from a user's decoded beams to their recommendation list, and from the
lists to a window's metrics.

Two kinds of metrics, combined across ranks differently:

- user-level (Hit@K, NDCG@K): a mean over users of a value of each user's list alone. Each rank
  scores its own users and adds up its share of the window's totals per user group
  (`group_sums`); the ranks' shares are summed (one all-reduce) and averaged (`averages`). A new
  one is a value of one user's rank of the target (`rank_metrics`).
- list-level (catalogue coverage@K, ...): a value of all users' lists of the window together,
  not a sum over users; it is computed from every list of the window in one place, where the
  lists are gathered (rank 0 gathers the current window's lists for recommendations.jsonl).
  `catalogue_coverage` is one; it is not reported yet.
"""

from __future__ import annotations

import math

from data_tools.windows import GROUPS
from train.evaluation.beam_search import NEG


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


def recommendation_list(
    codes: list[list[int]], scores: list[float], target: tuple, codebook
) -> tuple[list[int], list[float], int | None, int]:
    """One user's beams (best first) as their recommendation list: the items of the live beams
    (a -inf score is a dead beam), their log-probabilities to 6 decimals, the 0-based rank of the
    target's code `target` among them (None: not there), and the beams whose code is no item's
    (invalid outputs: the trie allows none)."""
    items, item_scores, rank, invalid = [], [], None, 0
    for code, score in zip(codes, scores):
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
    return items, item_scores, rank, invalid


def metric_keys(ks: list[int]) -> list[str]:
    """The user-level metrics' names, in the order of metrics.json: hit@K, ndcg@K per K."""
    return [f"{metric}@{k}" for k in ks for metric in ("hit", "ndcg")]


def group_sums(ranks: list, groups: list, invalid: int, ks: list[int]) -> list[float]:
    """One rank's share of a window's totals: per group (and overall) its users and the sums of
    their user-level metrics (`metric_keys`), then its invalid outputs."""
    keys = metric_keys(ks)
    sums = []
    for group in [None] + list(GROUPS):  # None: every user
        chosen = [r for r, g in zip(ranks, groups) if group is None or g == group]
        metrics = rank_metrics(chosen, ks)
        sums += [len(chosen)] + [metrics[key] * len(chosen) for key in keys]
    sums.append(invalid)
    return sums


def averages(total: list[float], ks: list[int]) -> dict:
    """A window's metrics from every rank's `group_sums` added up: "users", "overall" (the means
    over every user), "groups" (users and means per group) and "invalid_outputs"."""
    keys = metric_keys(ks)
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


def catalogue_coverage(item_lists: list[list[int]], k: int, catalogue_size: int) -> float:
    """Catalogue coverage@K, a list-level metric: the share of the catalogue's `catalogue_size`
    items that appear in the top `k` of at least one of the window's lists (all users' lists of
    the window, not one rank's share)."""
    shown = {item for items in item_lists for item in items[:k]}
    return len(shown) / catalogue_size if catalogue_size else 0.0
