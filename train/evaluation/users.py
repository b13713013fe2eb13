"""The test users a window's evaluation scores (one test sample per user): all of them, or, with
`eval.max_users`, a seeded random sample, the same for every method, period and rank count.
Also what tests, benchmarks, the demo and the recommender read to score the same users.
"""

from __future__ import annotations

import random

from data_tools.reader import read_samples_at, split_size


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
