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


def test_device_trie_masks_equal_allowed_mask(trie, catalog):
    """The trie as tensors (what beam search builds its masks with, on the logits' device) gives
    the same rows as `allowed_mask`, for catalog prefixes, prefixes that left the catalog at any
    level (random codes, tokens of the wrong level, ids past the trie's largest token, negative
    ids) and complete codes."""
    rng = random.Random(3)
    vocab = BASE + 4 * 256 + 3
    device_trie = trie.on("cpu")
    assert trie.on("cpu") is device_trie  # built once per device
    for depth in range(5):
        rows = [tuple(r[:depth]) for r in rng.sample(catalog.tolist(), 300)]
        rows += [s[:depth] for s in _random_codes(rng, 100)]
        if depth:
            for r in rng.sample(catalog.tolist(), 30):  # a catalog prefix whose last token is changed
                rows.append(tuple(r[: depth - 1]) + (rng.choice([0, 5, vocab - 1, BASE + rng.randrange(4 * 256)]),))
            rows.append(tuple(catalog[0][: depth - 1]) + (-1,))
        rng.shuffle(rows)
        ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), depth)
        expected = trie.allowed_mask([tuple(r) for r in rows], vocab)
        assert torch.equal(device_trie.allowed_mask(ids, vocab), expected), depth
        if depth < 4:
            left = sum(not trie.allowed(r) for r in rows)
            assert 0 < left < len(rows) if depth else left == 0  # both kinds of prefix were tried
    assert device_trie.allowed_mask(torch.empty(0, 2, dtype=torch.long), vocab).shape == (0, vocab)
    with pytest.raises(ValueError, match="beyond the vocabulary"):
        device_trie.allowed_mask(torch.zeros(1, 1, dtype=torch.long), BASE)


def test_device_trie_of_a_small_trie_walks_node_by_node():
    small = CodeTrie([(5, 7, 1), (5, 8, 2), (6, 7, 3), (5, 7, 4)])
    d = small.on(torch.device("cpu"))
    assert [k.tolist() for k in d.keys] == [[5, 6], [7, 8, 16], [1, 4, 11, 21]]  # parent * 9 + token
    assert d.walk(torch.tensor([[5, 7], [6, 7], [6, 8], [9, 7]])).tolist() == [0, 2, -1, -1]
    mask = d.mask(2, torch.tensor([0, 1, 2, -1]), 10)
    assert [row.nonzero().squeeze(1).tolist() for row in mask] == [[1, 4], [2], [3], []]
