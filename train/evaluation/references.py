"""The two references the evaluation scores beside the model, on the same users: the window's
most popular items (its most frequent training targets), which a recommender must beat, and a
stronger one that needs no model: the items that followed the user's last items among the
window's training targets (then the popular ones), which shows how much item-to-item signal the
window holds and how much of it the model has learned.

Both come from one pass over the window's training split (`window_references`); rank 0 scores
them for every evaluated user (`reference_ranks`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator

from data_tools.reader import iter_split, read_samples_at

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


def reference_ranks(
    root: str, manifest: dict, window: int, chosen: list[int], codebook, k: int
) -> Iterator[tuple[int, dict, int | None, int | None]]:
    """Both references scored for the window's test samples at positions `chosen` (of the test
    split), from one pass over the training split and one over those test samples: per sample,
    in the order read, its index in `chosen`, the sample, and the target's 0-based rank in the
    popularity reference's and in the transitions reference's top `k` (None: not in it)."""
    popular, following = window_references(root, manifest, window, codebook, k)
    position = {index: p for p, index in enumerate(chosen)}
    for index, sample in read_samples_at(root, window, "test", set(chosen), manifest):
        target = tuple(codebook.item_token_ids(sample["target"]))
        followers = transition_top(following, sample["history"], popular, k)
        yield position[index], sample, _rank_of(target, popular), _rank_of(target, followers)


def _rank_of(target: tuple, codes: list[tuple]) -> int | None:
    return codes.index(target) if target in codes else None
