"""The code trie admits exactly the catalog (the CDs index: 39,191 items, 38,508 distinct codes)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from data_tools.index.codes import import_codes
from data_tools.index.trie import CodeTrie

BASE = 1000  # token ids of code tokens: BASE + 256 * level + code, as after a 1,000-piece vocabulary


@pytest.fixture(scope="module")
def catalog(cds_blocks) -> np.ndarray:
    """Token-id sequences of the CDs items, one row per item (shared codes repeat)."""
    path = os.path.join(cds_blocks, "semantic_ids.json")
    with open(path) as f:
        keys = list(json.load(f))
    codes, _ = import_codes(path, {k: int(k) for k in keys})
    return np.array([[BASE + 256 * k + c for k, c in enumerate(codes[i])] for i in sorted(codes)], dtype=np.int64)


@pytest.fixture(scope="module")
def trie(catalog) -> CodeTrie:
    return CodeTrie(map(tuple, catalog.tolist()))


def _brute_allowed(catalog: np.ndarray, prefix: tuple) -> list[int]:
    k = len(prefix)
    if k == catalog.shape[1]:
        return []
    rows = (catalog[:, :k] == np.array(prefix, dtype=np.int64)).all(1) if k else np.ones(len(catalog), bool)
    return sorted(set(catalog[rows, k].tolist()))


def _random_codes(rng: random.Random, n: int) -> list[tuple]:
    return [tuple(BASE + 256 * k + rng.randrange(256) for k in range(4)) for _ in range(n)]


def test_every_catalog_code_is_in_and_nothing_else(trie, catalog):
    seqs = set(map(tuple, catalog.tolist()))
    assert len(trie) == len(seqs) == 38508
    assert all(s in trie for s in seqs)
    outside = [s for s in _random_codes(random.Random(0), 2000) if s not in seqs]
    assert len(outside) > 1900  # a random code is almost never an item's
    assert not any(s in trie for s in outside)
    # Walking a non-catalog code through the trie is refused at the step where it leaves.
    for s in outside[:300]:
        k = next(k for k in range(4) if s[k] not in trie.allowed(s[:k]))
        assert all(s[j] in trie.allowed(s[:j]) for j in range(k))


def test_allowed_matches_brute_force_at_every_depth(trie, catalog):
    rng = random.Random(1)
    prefixes = {()}
    for row in rng.sample(catalog.tolist(), 150):
        prefixes.update(tuple(row[:k]) for k in range(1, 5))
    for s in _random_codes(rng, 100):
        prefixes.update(s[:k] for k in range(1, 4))
    for p in prefixes:
        assert trie.allowed(p) == _brute_allowed(catalog, p), p
    assert trie.allowed(()) == sorted(set(catalog[:, 0].tolist()))
    assert trie.allowed(tuple(catalog[0])) == []  # a complete code: nothing follows


def test_allowed_mask_rows_equal_allowed(trie, catalog):
    rng = random.Random(2)
    vocab = BASE + 4 * 256 + 3
    for depth in range(4):
        prefixes = [tuple(r[:depth]) for r in rng.sample(catalog.tolist(), 40)]
        prefixes += [s[:depth] for s in _random_codes(rng, 8)]
        mask = trie.allowed_mask(prefixes, vocab)
        assert mask.shape == (48, vocab) and mask.dtype == torch.bool
        for row, p in zip(mask, prefixes):
            assert row.nonzero().squeeze(1).tolist() == trie.allowed(p)
        if depth:  # a LongTensor of generated tokens works the same
            assert torch.equal(trie.allowed_mask(torch.tensor(prefixes), vocab), mask)
    assert trie.allowed_mask([], vocab).shape == (0, vocab)


def test_sequences_must_share_one_length():
    with pytest.raises(ValueError, match="same non-zero length"):
        CodeTrie([(1, 2), (1, 2, 3)])
    with pytest.raises(ValueError, match="at least one"):
        CodeTrie([])
    small = CodeTrie([(5, 7), (5, 8), (6, 7), (5, 7)])
    assert (
        len(small) == 3 and small.allowed(()) == [5, 6] and small.allowed((5,)) == [7, 8] and small.allowed((9,)) == []
    )
