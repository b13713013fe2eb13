"""The dataset folder contract (see docs/folders.md, "Dataset folder"): its file names, paths and
manifest. How its files are written whole is data_tools/atomic.py."""

from __future__ import annotations

import hashlib
import json
import os

from data_tools.readback import DamagedFile, check_fields, check_shard, read_json

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


def dataset_remedy(root: str) -> str:
    """What to do about a damaged file of the dataset folder `root`."""
    return (
        f"rebuild the dataset folder {root} from its inputs (`python -m data_tools convert ... --force`, then the "
        "same appends: the same inputs give the same bytes, docs/data.md), or restore it from a copy"
    )


def shard_remedy(path: str) -> str:
    """What to do about a damaged shard (`<root>/windows/NN/<name>.tar`)."""
    return dataset_remedy(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path)))))


SPLITS = ("train", "valid", "test")
_STATS = {
    "users": int,
    "new_users": int,
    "dormant_users": int,
    "items": int,
    "new_items": int,
    "interactions": int,
    "avg_seq_len": float,
    "samples": dict,
}
_SHARD = {"name": str, "samples": int, "bytes": int}


def load_manifest(root: str) -> dict:
    """The dataset folder's manifest, checked for what the readers use (a FileNotFoundError for a
    folder without one; a DamagedFile for one that is truncated or hand-edited)."""
    path = os.path.join(root, MANIFEST)
    if not os.path.lexists(path):
        raise FileNotFoundError(
            f"{root} is not a dataset folder (no {MANIFEST}); create one with `python -m data_tools convert`"
        )
    how = {"what": "the dataset's manifest", "remedy": dataset_remedy(root)}
    m = read_json(path, **how, fields={"schema_version": int})
    if m["schema_version"] != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {m.get('schema_version')} is not {SCHEMA_VERSION}; reconvert with this version"
        )
    check_fields(m, {"windows": list, "counts": dict, "split": dict, "accounting": dict}, path, **how)
    check_fields(m["counts"], {"interactions": int, "users": int, "items": int}, path, **how, where="counts")
    check_fields(m["split"], {"rule": str}, path, **how, where="split")
    for name, a in m["accounting"].items():
        check_fields(a, {"read": int, "kept": int, "dropped": dict}, path, **how, where=f"accounting of {name}")
    for t, w in enumerate(m["windows"]):
        where = f"window {t}"
        check_fields(w, {"index": int, "stats": dict, "shards": dict}, path, **how, where=where)
        check_fields(w["stats"], _STATS, path, **how, where=f"{where}'s stats")
        check_fields(w["stats"]["samples"], dict.fromkeys(SPLITS, int), path, **how, where=f"{where}'s samples")
        check_fields(w["shards"], dict.fromkeys(SPLITS, list), path, **how, where=f"{where}'s shards")
        for split in SPLITS:
            for k, shard in enumerate(w["shards"][split]):
                check_fields(shard, _SHARD, path, **how, where=f"{where}'s {split} shard {k}")
                if os.path.basename(shard["name"]) != shard["name"] or not shard["name"]:
                    raise DamagedFile(
                        path, f"names a shard {shard['name']!r} outside {where}'s folder (hand-edited?)", **how
                    )
    return m


def check_shards(root: str, manifest: dict, windows, splits=SPLITS, *, full: bool = False, only=None) -> None:
    """That the shards of `windows` (their `splits`) are the ones the manifest records: present,
    of the recorded size, and with `full` of the recorded sha256 (one read of each). `only`: a
    set of shard paths to look at (a rank's share), all of them by default."""
    for t in windows:
        for split in splits:
            for path, record in zip(
                (p for p, _ in split_shards(root, manifest, t, split)), manifest["windows"][t]["shards"][split]
            ):
                if only is None or path in only:
                    what = f"the {split} shard of window {t}"
                    check_shard(path, record, what=what, remedy=dataset_remedy(root), full=full)


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
