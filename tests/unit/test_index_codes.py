"""Collision resolution on the last level (`codes.assign_unique`)."""

from __future__ import annotations

import numpy as np
import pytest

from data_tools.accounting import InputError
from data_tools.index.codes import assign_unique


def test_contested_and_taken_codes_move_to_the_nearest_free_code():
    book = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])  # last-level codewords 0..4 on a line
    codes = np.array([[7, 1], [7, 1], [7, 2], [8, 1], [7, 0]])
    residuals = np.array([[1.1], [0.8], [2.2], [1.0], [0.0]])
    out, report = assign_unique(codes, residuals, book, taken={(7, 2)})
    # Rows 0 and 1 want codeword 1: row 0 (at 1.1) is nearer and keeps it. Row 2 wants the taken
    # 2. The free codes are 3 and 4 (0 is row 4's, uncontested; row 3 has another prefix). Both
    # losers prefer 3; the nearest pair goes first: row 2 (2.2) gets 3, row 1 (0.8) gets 4.
    assert out[:, 1].tolist() == [1, 4, 3, 1, 0]
    assert out[:, 0].tolist() == codes[:, 0].tolist()  # prefixes never change
    assert report == {"items": 5, "colliding_items": 3, "codes_contested": 2, "reassigned": 2}


def test_random_collisions_resolve_uniquely_and_minimally():
    rng = np.random.default_rng(0)
    K = 16
    codes = np.stack([rng.integers(0, 3, 120), rng.integers(0, 4, 120), rng.integers(0, 6, 120)], 1)
    residuals = rng.normal(size=(120, 4))
    book = rng.normal(size=(K, 4))
    taken = {(0, 0, k) for k in range(4)} | {(2, 3, 5)}
    out, report = assign_unique(codes, residuals, book, taken)
    rows = [tuple(r) for r in out.tolist()]
    assert len(set(rows)) == 120 and not set(rows) & taken
    assert (out[:, :2] == codes[:, :2]).all() and (out[:, 2] < K).all()
    # Only colliding items move, and from each contested free code exactly one item keeps it.
    natural = [tuple(r) for r in codes.tolist()]
    counts = {c: natural.count(c) for c in set(natural)}
    wanted = [c for c in natural if counts[c] > 1 or c in taken]
    assert report["colliding_items"] == len(wanted)
    assert report["reassigned"] == len(wanted) - len({c for c in wanted if c not in taken})
    moved = sum(a != b for a, b in zip(natural, rows))
    assert moved == report["reassigned"]


def test_a_full_prefix_is_a_clear_error():
    codes = np.zeros((5, 2), dtype=np.int64)
    with pytest.raises(InputError, match="5 items share the prefix <a_0> but the last level has only 4 codes"):
        assign_unique(codes, np.zeros((5, 1)), np.arange(4.0).reshape(4, 1), taken=set())
