"""Import data that is already cut into blocks, in the PESO authors' format.

Each `block_<k>.json` maps `user -> {"previous_block": [...], "current_block": [...]}` (item ids,
oldest first). The files carry no timestamps, so the stream gets an ordinal clock. A user's
`previous_block` must extend what earlier block files showed of them; the part no earlier file
explains (activity in blocks where the user had fewer than 5 interactions) becomes history with
window -1 ("before, window unknown"): it feeds histories but is not activity in any window, so a
user absent from block k-1's file is dormant in block k, as the paper defines it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re

import numpy as np

from data_tools.accounting import InputError, Ledger
from data_tools.progress import progress_bar
from data_tools.stream import Stream
from data_tools.textio import open_input


def block_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise InputError("--reviews for --format blocks must be the folder of block_<k>.json files", folder)
    files = glob.glob(os.path.join(folder, "block_*.json"))
    numbered = sorted((int(m.group(1)), f) for f in files if (m := re.search(r"block_(\d+)\.json$", f)))
    if not numbered:
        raise InputError("no block_<k>.json files", folder)
    if [k for k, _ in numbered] != list(range(len(numbered))):
        raise InputError(
            f"block files must be numbered 0..{len(numbered) - 1} without gaps, found {[k for k, _ in numbered]}",
            folder,
        )
    return [f for _, f in numbered]


def _items(value, path: str, user: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise InputError(f"user {user!r}: {key} must be a list of item id strings", path)
    return value


def _block_source(path: str, raw: bytes) -> dict:
    """The manifest's record of one block file."""
    return {
        "role": "block",
        "path": os.path.abspath(path),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "bytes": len(raw),
        "format": "blocks",
    }


def _block_table(path: str, raw: bytes) -> dict:
    """A block file's `user -> {previous_block, current_block}` object."""
    try:
        table = json.loads(raw)
    except ValueError as e:
        raise InputError(f"not a JSON object ({e})", path) from None
    if not isinstance(table, dict):
        raise InputError("a block file must map user -> {previous_block, current_block}", path)
    return table


def read_blocks(folder: str, ledger: Ledger, progress: bool = True) -> tuple[Stream, list[dict]]:
    """Build the stream (windows = blocks) and describe each file as a source."""
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    u_col, i_col, w_col = [], [], []
    known: dict[int, list[str]] = {}  # what earlier blocks showed of each user
    sources = []
    files = block_files(folder)
    item_first: dict[int, int] = {}
    for b, path in enumerate(progress_bar(files, desc="blocks", enabled=progress)):
        with open_input(path) as f:
            raw = f.read()
        sources.append(_block_source(path, raw))
        table = _block_table(path, raw)
        for user in sorted(table):
            entry = table[user]
            if not isinstance(entry, dict):
                raise InputError(f"user {user!r}: expected an object", path)
            prev = _items(entry.get("previous_block", []), path, user, "previous_block")
            cur = _items(entry.get("current_block"), path, user, "current_block")
            u = users.setdefault(user, len(users))
            seen = known.get(u, [])
            if prev[: len(seen)] != seen:
                raise InputError(f"user {user!r}: previous_block does not extend the history earlier blocks gave", path)
            extra = prev[len(seen) :]
            for src, w in [(x, -1) for x in extra] + [(x, b) for x in cur]:
                i = items.setdefault(src, len(items))
                item_first.setdefault(i, max(b - 1, 0) if w < 0 else b)
                u_col.append(u)
                i_col.append(i)
                w_col.append(w)
            ledger.read += len(extra) + len(cur)
            ledger.kept += len(extra) + len(cur)
            known[u] = prev + cur
    n = len(u_col)
    stream = Stream(
        user=np.asarray(u_col, dtype=np.int32),
        item=np.asarray(i_col, dtype=np.int32),
        ts=np.arange(n, dtype=np.int64),  # ordinal clock: the files carry no time
        user_ids=list(users),
        item_ids=list(items),
        window=np.asarray(w_col, dtype=np.int16),
        item_first_window=np.asarray([item_first[i] for i in range(len(items))], dtype=np.int16),
    )
    stream.notes["history_only_interactions"] = int((stream.window < 0).sum())
    return stream, sources


def slice_blocks(folder: str, out: str, users: int, index: str | None = None) -> str:
    """A small copy of a blocks folder, for tests and benchmarks: in each block its first `users`
    users plus up to `users` of the slice's users from earlier blocks who are back (so later
    blocks keep dormant and continuing users), and the semantic IDs of the items they touch
    (from `index`, a `semantic_ids.json`). Returns `out`."""
    os.makedirs(out, exist_ok=True)
    kept, touched = set(), set()
    for k, path in enumerate(block_files(folder)):
        with open(path) as f:
            block = json.load(f)
        chosen = list(block)[:users] + [u for u in block if u in kept][:users]
        kept.update(chosen)
        for u in chosen:
            touched.update(block[u]["previous_block"] + block[u]["current_block"])
        with open(os.path.join(out, f"block_{k}.json"), "w") as f:
            json.dump({u: block[u] for u in chosen}, f)
    if index:
        with open(index) as f:
            codes = json.load(f)
        with open(os.path.join(out, "semantic_ids.json"), "w") as f:
            json.dump({i: codes[i] for i in sorted(touched, key=lambda i: (len(i), i))}, f)
    return out
