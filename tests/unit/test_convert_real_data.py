"""Real data end to end: MovieLens-100K and the paper's CDs blocks, converted and read back."""

from __future__ import annotations

import csv
import json
import os
import sys

from data_tools.convert import ConvertOptions, convert
from data_tools.dataset import load_manifest
from data_tools.reader import window_split


def _load_ids(root: str, name: str) -> list[str]:
    with open(os.path.join(root, name)) as f:
        return [json.loads(line)["source_id"] for line in f]


def _read_all(root: str) -> dict:
    """(window, split) -> list of samples, through the train-side reader."""
    m = load_manifest(root)
    return {
        (t, s): list(window_split(root, t, s, manifest=m))
        for t in range(len(m["windows"]))
        for s in ("train", "valid", "test")
    }


def _expected_movielens(inter_path: str, first=0.6, windows=4, min_inter=5, max_hist=20):
    """The dataset rules restated independently: (window, split) -> set of
    (user, history, target, group), all as source ids."""
    with open(inter_path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    events = sorted({(int(float(ts)), u, i) for u, i, _, ts in rows})  # dedupe, order (time, user, item)
    n = len(events)
    n0 = int(n * first)
    cuts = [0] + [n0 + (n - n0) * k // windows for k in range(windows)] + [n]
    win = [next(w for w in range(len(cuts) - 1) if cuts[w] <= k < cuts[w + 1]) for k in range(n)]
    by_user: dict[str, list[tuple[int, str]]] = {}
    for k, (_, u, i) in enumerate(events):
        by_user.setdefault(u, []).append((win[k], i))
    expected = {(t, s): set() for t in range(windows + 1) for s in ("train", "valid", "test")}
    for u, seq in by_user.items():
        for t in range(windows + 1):
            pos = [p for p, (w, _) in enumerate(seq) if w == t]
            if len(pos) < min_inter:
                continue
            before = {w for w, _ in seq[: pos[0]]}
            group = "new" if pos[0] == 0 else ("continuing" if t - 1 in before else "dormant")
            for p in pos:
                split = "test" if p == pos[-1] else "valid" if p == pos[-2] else "train"
                history = tuple(i for _, i in seq[max(0, p - max_hist) : p])  # empty for a new user's first item
                expected[(t, split)].add((u, history, seq[p][1], group))
    return expected


def test_movielens_every_sample_matches_independent_computation(ml_dataset, movielens_files):
    users, items = _load_ids(ml_dataset, "users.jsonl"), _load_ids(ml_dataset, "items.jsonl")
    got = _read_all(ml_dataset)
    expected = _expected_movielens(movielens_files[0])
    assert set(got) == set(expected)
    total = 0
    for key, samples in got.items():
        as_source = [
            (users[s["user"]], tuple(items[i] for i in s["history"]), items[s["target"]], s["group"]) for s in samples
        ]
        assert len(as_source) == len(set(as_source)), f"duplicate samples in {key}"
        assert set(as_source) == expected[key], f"{key}: {len(set(as_source) ^ expected[key])} samples differ"
        total += len(samples)
    m = load_manifest(ml_dataset)
    assert total == sum(m["counts"]["samples"].values()) == 99665
    assert m["accounting"]["reviews"] == {"read": 100000, "kept": 100000, "dropped": {}, "examples": {}}
    # items.jsonl carries the titles from ml-100k.item
    with open(os.path.join(ml_dataset, "items.jsonl")) as f:
        first = json.loads(f.readline())
    assert first["title"] and first["text"].startswith(first["title"])


def test_cds_blocks_import_matches_published_counts(tmp_path, cds_blocks):
    out = str(tmp_path / "cds")
    m = convert(
        ConvertOptions(
            format="blocks",
            reviews=cds_blocks,
            index=os.path.join(cds_blocks, "semantic_ids.json"),
            out=out,
            progress=False,
            log=sys.stdout,
        )
    )
    # shared/data/amazon-cds-blocks/README.md: users / interactions / new users per block
    published = [(8494, 81355, 8494), (1013, 8686, 681), (866, 7488, 525), (1078, 9468, 672), (1074, 9421, 746)]
    got = [(w["stats"]["users"], w["stats"]["interactions"], w["stats"]["new_users"]) for w in m["windows"]]
    assert got == published
    # Every test sample reproduces the block file: history = (previous + current[:-1])[-20:].
    items = _load_ids(out, "items.jsonl")
    users = _load_ids(out, "users.jsonl")
    for t in (1, 4):
        with open(os.path.join(cds_blocks, f"block_{t}.json")) as f:
            block = json.load(f)
        with open(os.path.join(cds_blocks, f"block_{t - 1}.json")) as f:
            previous = json.load(f)
        tests = list(window_split(out, t, "test"))
        assert len(tests) == len(block)
        for s in tests:
            entry = block[users[s["user"]]]
            seq = entry["previous_block"] + entry["current_block"]
            assert items[s["target"]] == seq[-1]
            assert [items[i] for i in s["history"]] == seq[:-1][-20:]
            u = users[s["user"]]
            assert s["group"] == (
                "new" if not entry["previous_block"] else "continuing" if u in previous else "dormant"
            )
    with open(os.path.join(out, "item_index.json")) as f:
        index = json.load(f)
    with open(os.path.join(cds_blocks, "semantic_ids.json")) as f:
        original = json.load(f)
    assert {items[int(k)]: v for k, v in index["items"].items()} == original
    assert m["index_collisions"]["items_sharing_a_code"] > 0  # the released index has a few
