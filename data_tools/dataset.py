"""The dataset folder contract (see docs/folders.md, "Dataset folder"): its file names, paths and
manifest. How its files are written whole is data_tools/atomic.py."""

from __future__ import annotations

import hashlib
import json
import os

# 2: a new user's first interaction is a training sample (empty history); 1 dropped it.
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
ITEMS = "items.jsonl"
USERS = "users.jsonl"
ITEM_INDEX = "item_index.json"
# Kept by calendar datasets for `python -m data_tools append` (data_tools/history.py).
STREAM_STATE = "stream_state.npz"
PENDING = "pending.jsonl"
PENDING_META = "pending_meta.jsonl"


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


def window_fingerprint(manifest: dict, t: int) -> str:
    """A hash of window t's shards as the manifest records them (name, samples, bytes and, for
    datasets written since appends exist, each shard's sha256): a run records it for every
    period it trains, and refuses to go on if a finished period's window has changed since."""
    windows = manifest["windows"]
    if not 0 <= t < len(windows):
        raise ValueError(f"window {t} does not exist: the dataset has windows 0..{len(windows) - 1}")
    shards = windows[t]["shards"]
    canonical = json.dumps({split: shards[split] for split in sorted(shards)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
