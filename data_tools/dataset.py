"""The dataset folder contract (see docs/folders.md, "Dataset folder"): its file names, paths and
manifest. How its files are written whole is data_tools/atomic.py."""

from __future__ import annotations

import json
import os

# 2: a new user's first interaction is a training sample (empty history); 1 dropped it.
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
ITEMS = "items.jsonl"
USERS = "users.jsonl"
ITEM_INDEX = "item_index.json"


def window_dir(root: str, t: int) -> str:
    return os.path.join(root, "windows", f"{t:02d}")


def load_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{root} is not a dataset folder (no {MANIFEST}); create one with `python -m data_tools convert`"
        )
    with open(path) as f:
        m = json.load(f)
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {m.get('schema_version')} is not {SCHEMA_VERSION}; reconvert with this version"
        )
    return m


def split_shards(root: str, manifest: dict, t: int, split: str) -> list[tuple[str, int]]:
    """(path, samples) of each shard of one window's split, in order."""
    windows = manifest["windows"]
    if not 0 <= t < len(windows):
        raise ValueError(f"window {t} does not exist: the dataset has windows 0..{len(windows) - 1}")
    return [(os.path.join(window_dir(root, t), s["name"]), s["samples"]) for s in windows[t]["shards"][split]]
