"""What a calendar dataset keeps so that new reviews can be appended without reading the old
files again (data_tools/append.py; docs/data.md, "Keeping a dataset fresh").

- `stream_state.npz`: per dense user id, how many interactions the user has in the closed
  windows (`count`: the next sample key's position), the last window the user was active in
  (`last_window`: new, dormant or continuing in the next one) and the user's last
  `max_history` items (`recent`, right-aligned, -1 before the first: the history of the user's
  next samples).
- `pending.jsonl`: the interactions of the windows still open (held back: the stream has not
  passed their end), with source ids and seconds, one `[user, item, ts]` per line in stream
  order. They have no dense ids yet: ids are given when a window closes, in stream order, so an
  appended dataset numbers its users and items exactly as a one-shot conversion would.
- `pending_meta.jsonl`: the metadata already read for items that appear only in open windows.

All three are rewritten whole by each conversion or append, inside the folder that is renamed
into place (data_tools/atomic.py `written_aside`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import orjson

from data_tools.atomic import replaced_on_close
from data_tools.dataset import PENDING, PENDING_META, STREAM_STATE, dataset_remedy
from data_tools.readback import DamagedFile, iter_jsonl, load_npy, read_jsonl
from data_tools.windows import UserMajor


@dataclass
class UserState:
    count: np.ndarray  # int64 [users]: interactions in the closed windows
    last_window: np.ndarray  # int32 [users]: the last closed window the user was active in
    recent: np.ndarray  # int32 [users, max_history]: the last items, right-aligned, -1 padded

    @classmethod
    def empty(cls, max_history: int) -> UserState:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int32), np.full((0, max_history), -1, np.int32))

    @property
    def users(self) -> int:
        return len(self.count)

    def grow(self, users: int) -> None:
        """Room for `users` users: the new ones have no history yet."""
        extra = users - self.users
        self.count = np.concatenate([self.count, np.zeros(extra, np.int64)])
        self.last_window = np.concatenate([self.last_window, np.full(extra, -1, np.int32)])
        self.recent = np.concatenate([self.recent, np.full((extra, self.recent.shape[1]), -1, np.int32)])

    def prefix(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each of `users`' recent items, oldest first, as (user, item, window) rows: what an
        append puts before the user's new interactions, labelled with the user's last window."""
        rows = self.recent[users]
        mask = rows >= 0
        counts = mask.sum(axis=1)
        return (
            np.repeat(users, counts).astype(np.int32),
            rows[mask].astype(np.int32),
            np.repeat(self.last_window[users], counts).astype(np.int16),
        )

    def update(self, by_user: UserMajor, offset: np.ndarray) -> None:
        """Take in the interactions of `by_user` (which holds, per user, the recent items of
        `prefix` first, then the new interactions); `offset[u]` = the user's interactions
        before its rows there."""
        starts, ends = by_user.start[:-1], by_user.start[1:]
        active = np.flatnonzero(ends > starts)
        s, e = starts[active], ends[active]
        self.count[active] = offset[active] + (e - s)
        self.last_window[active] = by_user.window[e - 1]
        width = self.recent.shape[1]
        idx = e[:, None] - width + np.arange(width)[None, :]
        valid = idx >= s[:, None]
        self.recent[active] = np.where(valid, by_user.item[np.maximum(idx, 0)], -1)

    def save(self, folder: str) -> None:
        with replaced_on_close(os.path.join(folder, STREAM_STATE), fsync=False) as f:
            np.savez(f, count=self.count, last_window=self.last_window, recent=self.recent)

    @classmethod
    def load(cls, folder: str) -> UserState:
        path = os.path.join(folder, STREAM_STATE)
        how = {"what": "the users' stream state", "remedy": dataset_remedy(folder)}
        z = load_npy(path, **how)
        if not isinstance(z, dict) or not {"count", "last_window", "recent"} <= z.keys():
            raise DamagedFile(path, "lacks the arrays count, last_window and recent", **how)
        return cls(z["count"].astype(np.int64), z["last_window"].astype(np.int32), z["recent"].astype(np.int32))


def write_pending(folder: str, rows, meta: dict[str, tuple[str, str]]) -> None:
    """The held-back interactions (`(user source id, item source id, ts)`, in stream order) and
    the metadata read for items that appear only there."""
    with replaced_on_close(os.path.join(folder, PENDING), fsync=False, buffering=1 << 20) as f:
        for row in rows:
            f.write(orjson.dumps(row) + b"\n")
    with replaced_on_close(os.path.join(folder, PENDING_META), fsync=False) as f:
        for src in sorted(meta):
            title, text = meta[src]
            f.write(orjson.dumps({"source_id": src, "title": title, "text": text}) + b"\n")


def read_pending(folder: str) -> tuple[list, dict[str, tuple[str, str]]]:
    """What `write_pending` wrote: the rows, and item source id -> (title, text)."""
    remedy = dataset_remedy(folder)
    path = os.path.join(folder, PENDING)
    rows = read_jsonl(path, what="the held-back interactions", remedy=remedy, kind=list)
    for number, row in enumerate(rows, 1):
        if len(row) != 3:
            raise DamagedFile(path, f"has {row!r:.60} at line {number}, not [user, item, time]", remedy=remedy)
    meta = {}
    for rec in iter_jsonl(
        os.path.join(folder, PENDING_META),
        what="the held-back items' metadata",
        remedy=remedy,
        fields={"source_id": str, "title": str, "text": str},
    ):
        meta[rec["source_id"]] = (rec["title"], rec["text"])
    return rows, meta
