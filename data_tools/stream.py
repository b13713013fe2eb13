"""Raw records -> one normalized, time-ordered interaction stream with dense integer ids.

The stream is a handful of numpy arrays (about 20 bytes per interaction) plus the two id maps,
so a multi-million-review file converts in a few hundred MB. Its order is (time, then source
user id, then source item id), so it does not depend on the order of the input lines; dense ids
are given in order of first appearance in that stream, so items of later windows get larger ids.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import numpy as np
import orjson

from data_tools.accounting import Ledger, Skip
from data_tools.formats import UNIT_BOUNDARY, ReviewFormat
from data_tools.textio import LineStream


@dataclass
class Stream:
    """Interactions in stream order. `window` is filled by the split rule (-1 = before any window)."""

    user: np.ndarray  # int32, dense user id
    item: np.ndarray  # int32, dense item id
    ts: np.ndarray  # int64, seconds (or an ordinal for pre-blocked data)
    user_ids: list[str]  # dense id -> source id
    item_ids: list[str]
    window: np.ndarray | None = None  # int16
    item_first_window: np.ndarray | None = None  # int16, per dense item id
    notes: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.user)


class IdCollector:
    """Collect raw (user, item, ts, rating) rows with provisional ids (input order)."""

    def __init__(self):
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.u, self.i = array("i"), array("i")
        self.ts, self.rating = array("q"), array("f")

    def add(self, user: str, item: str, ts: int, rating: float) -> None:
        u = self.users.get(user)
        if u is None:
            u = self.users[user] = len(self.users)
        i = self.items.get(item)
        if i is None:
            i = self.items[item] = len(self.items)
        self.u.append(u)
        self.i.append(i)
        self.ts.append(ts)
        self.rating.append(rating)

    def read(self, lines: LineStream, fmt: ReviewFormat, ledger: Ledger, max_seconds: int) -> None:
        """The hot loop of a conversion: parse, validate and collect every line of one file."""
        before = len(self.u)
        for first, chunk in lines.chunks():
            if fmt.header and first == 1:
                chunk, first = chunk[1:], 2  # the column names are not a record
            ledger.read += len(chunk)
            if fmt.json_keys:
                self._json_chunk(chunk, first, fmt, ledger, lines.path, max_seconds)
            else:
                self._parsed_chunk(chunk, first, fmt, ledger, lines.path, max_seconds)
        ledger.kept += len(self.u) - before

    def _parsed_chunk(self, chunk, first, fmt, ledger, path, max_seconds):
        add, parse = self.add, fmt.parse
        for k, line in enumerate(chunk, first):
            try:
                add(*parse(line, max_seconds))
            except Skip as s:
                ledger.skip(s, path, k)

    def _json_chunk(self, chunk, first, fmt, ledger, path, max_seconds):
        """Fast path for the common, clean record (about half the cost of the general parser);
        anything unusual is handed to `fmt.parse`, which decides and names the reason."""
        uk, ik, tk, rk = fmt.json_keys
        scale = 1000 if fmt.unit == "ms" else 1
        lo = int(UNIT_BOUNDARY) if scale == 1000 else 1
        hi = (max_seconds + 1) * scale if scale == 1000 else min(int(UNIT_BOUNDARY), max_seconds + 1)
        users, items = self.users, self.items
        ua, ia, ta, ra = self.u.append, self.i.append, self.ts.append, self.rating.append
        loads, parse, add = orjson.loads, fmt.parse, self.add
        for k, line in enumerate(chunk, first):
            try:
                rec = loads(line)
                u, i, t, r = rec[uk], rec[ik], rec[tk], rec[rk]
                fast = (
                    type(u) is str
                    and type(i) is str
                    and u
                    and i
                    and type(t) is int
                    and lo <= t < hi
                    and type(r) is float
                )
            except Exception:
                fast = False
            if fast:
                uid = users.get(u)
                if uid is None:
                    uid = users[u] = len(users)
                iid = items.get(i)
                if iid is None:
                    iid = items[i] = len(items)
                ua(uid)
                ia(iid)
                ta(t // scale)
                ra(r)
            else:
                try:
                    add(*parse(line, max_seconds))
                except Skip as s:
                    ledger.skip(s, path, k)


def _ranks(ids: dict[str, int]) -> np.ndarray:
    """rank[provisional id] = position of the source id in sorted order."""
    names = list(ids)
    order = sorted(range(len(names)), key=names.__getitem__)
    rank = np.empty(len(names), dtype=np.int32)
    rank[np.asarray(order, dtype=np.int64)] = np.arange(len(names), dtype=np.int32)
    return rank


def _kcore(u: np.ndarray, i: np.ndarray, k: int) -> np.ndarray:
    """Mask of interactions that survive iterative removal of users and items with < k of them."""
    keep = np.ones(len(u), dtype=bool)
    while True:
        uc = np.bincount(u[keep], minlength=u.max() + 1 if len(u) else 0)
        ic = np.bincount(i[keep], minlength=i.max() + 1 if len(i) else 0)
        bad = keep & ((uc[u] < k) | (ic[i] < k))
        if not bad.any():
            return keep
        keep &= ~bad


def _dense(ids: np.ndarray, names: dict[str, int]) -> tuple[np.ndarray, list[str]]:
    """Re-number provisional ids by first appearance in stream order."""
    uniq, first = np.unique(ids, return_index=True)
    order = uniq[np.argsort(first, kind="stable")]
    remap = np.full(len(names), -1, dtype=np.int32)
    remap[order] = np.arange(len(order), dtype=np.int32)
    inverse = list(names)
    return remap[ids], [inverse[j] for j in order.tolist()]


def normalize(
    c: IdCollector, ledger: Ledger, min_rating: float | None, kcore: int | None, late_before: int | None = None
) -> Stream:
    """Filter, order, de-duplicate and re-number the collected rows; every drop is counted.
    `late_before` (an append): rows dated before it fall into a window already written and are
    dropped as `late`."""
    u = np.frombuffer(c.u, dtype=np.int32)
    i = np.frombuffer(c.i, dtype=np.int32)
    ts = np.frombuffer(c.ts, dtype=np.int64)
    keep = np.ones(len(u), dtype=bool)
    if late_before is not None:
        late = ts < late_before
        ledger.drop_later("late", int(late.sum()))
        keep &= ~late
    if min_rating is not None:
        r = np.frombuffer(c.rating, dtype=np.float32)
        missing = keep & np.isnan(r)
        ledger.drop_later("rating_missing", int(missing.sum()))
        low = keep & ~missing & (r < min_rating)
        ledger.drop_later("below_min_rating", int(low.sum()))
        keep &= ~missing & ~low
    u, i, ts = u[keep], i[keep], ts[keep]

    # Stable order: time, then source user id, then source item id.
    order = np.lexsort((_ranks(c.items)[i], _ranks(c.users)[u], ts))
    u, i, ts = u[order], i[order], ts[order]
    dup = np.zeros(len(u), dtype=bool)
    if len(u) > 1:
        dup[1:] = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (ts[1:] == ts[:-1])
    ledger.drop_later("duplicate", int(dup.sum()))
    u, i, ts = u[~dup], i[~dup], ts[~dup]

    if kcore and kcore > 1 and len(u):
        keep = _kcore(u, i, kcore)
        ledger.drop_later("kcore", int((~keep).sum()))
        u, i, ts = u[keep], i[keep], ts[keep]

    u, user_ids = _dense(u, c.users)
    i, item_ids = _dense(i, c.items)
    return Stream(user=u, item=i, ts=ts.copy(), user_ids=user_ids, item_ids=item_ids)


def first_windows(stream: Stream) -> np.ndarray:
    """Per item, the window of its first interaction (dense ids follow first appearance)."""
    _, first = np.unique(stream.item, return_index=True)
    return stream.window[first].astype(np.int16)
