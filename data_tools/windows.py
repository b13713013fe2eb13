"""Time windows and the prediction targets inside them.

Split rules label every interaction of the stream with its window (`label_windows`). Then, per
window (`targets_per_window`), each user with at least `min_interactions` there contributes
targets: the last interaction is the test target, the second-to-last the validation target, the
others training targets; each carries the user's group in that window: new (nothing before),
dormant (something before, nothing in the previous window) or continuing. A target is a position
in the stream re-ordered by user (`UserMajor`), so its history is what the user did just before
it, earlier windows included; convert.py cuts that to the last `max_history` items when it
writes the sample. A new user's very first item is a training target with an empty history (as
in the authors' code: the model learns what people start with); the window's statistics count
them (`train_targets_without_history`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_tools.accounting import InputError

DAY = 86400
SPLITS = ("train", "valid", "test")
GROUPS = ("new", "dormant", "continuing")


@dataclass(frozen=True)
class SplitRule:
    kind: str  # "paper" | "calendar" | "blocks"
    first_fraction: float = 0.6
    windows: int = 4  # incremental windows after the first (paper rule)
    days: int = 0  # span of a calendar window

    @classmethod
    def parse(cls, text: str) -> SplitRule:
        """`paper`, `paper:FIRST_FRACTION:WINDOWS` (e.g. paper:0.6:4) or `calendar:DAYS`."""
        kind, _, rest = text.partition(":")
        try:
            if kind == "paper":
                if not rest:
                    return cls("paper")
                frac, _, n = rest.partition(":")
                rule = cls("paper", float(frac), int(n) if n else 4)
                if not (0 < rule.first_fraction < 1) or rule.windows < 1:
                    raise ValueError
                return rule
            if kind == "calendar":
                days = int(rest)
                if days < 1:
                    raise ValueError
                return cls("calendar", days=days)
        except ValueError:
            pass
        raise InputError(
            f"bad --split {text!r}: use paper, paper:FIRST_FRACTION:WINDOWS (e.g. paper:0.6:4) or calendar:DAYS"
        )

    def to_json(self) -> dict:
        if self.kind == "paper":
            return {"rule": "paper", "first_fraction": self.first_fraction, "windows": self.windows + 1}
        if self.kind == "calendar":
            return {"rule": "calendar", "days": self.days}
        return {"rule": "blocks"}


def paper_boundaries(n: int, first_fraction: float, windows: int) -> list[int]:
    """Stream positions where windows start: the first `first_fraction` of the interactions, then
    `windows` equal-count windows (the paper's D1 and D2..D5); the last entry is n."""
    n0 = int(n * first_fraction)
    rest = n - n0
    return [0] + [n0 + (rest * k) // windows for k in range(windows)] + [n]


def label_windows(ts: np.ndarray, rule: SplitRule) -> tuple[np.ndarray, list[dict]]:
    """Window index per interaction (stream order), and each window's span."""
    n = len(ts)
    if rule.kind == "paper":
        bounds = paper_boundaries(n, rule.first_fraction, rule.windows)
        window = np.repeat(np.arange(len(bounds) - 1, dtype=np.int16), np.diff(bounds))
        spans = [{"start": int(bounds[k]), "end": int(bounds[k + 1])} for k in range(len(bounds) - 1)]
    elif rule.kind == "calendar":
        window, spans = label_calendar(ts, calendar_origin(int(ts[0])), rule.days)
    else:
        raise ValueError(rule.kind)
    _add_times(ts, spans)
    return window, spans


def _add_times(ts: np.ndarray, spans: list[dict], offset: int = 0) -> None:
    """Each non-empty span's first and last timestamp (`start`/`end` are `offset` + positions in `ts`)."""
    for s in spans:
        if s["end"] > s["start"]:
            s["first_ts"], s["last_ts"] = int(ts[s["start"] - offset]), int(ts[s["end"] - 1 - offset])


def calendar_origin(first_ts: int) -> int:
    """Where calendar window 0 starts: midnight (UTC) of the stream's first day. A dataset keeps
    it (the manifest's `split.origin`), so appended reviews fall into the same windows."""
    return int(first_ts) // DAY * DAY


def label_calendar(
    ts: np.ndarray, origin: int, days: int, first_window: int = 0, first_position: int = 0
) -> tuple[np.ndarray, list[dict]]:
    """Calendar windows of `days` days from `origin`: the window of each interaction of `ts`
    (time-ordered, none before window `first_window`), and the spans of windows
    `first_window`..the last one, with `start`/`end` counted from `first_position` (where `ts`
    begins in the whole stream)."""
    span = days * DAY
    idx = (ts - origin) // span
    if len(ts) and idx[-1] >= np.iinfo(np.int16).max:
        raise InputError(f"calendar:{days} makes {int(idx[-1]) + 1} windows; use longer windows")
    window = idx.astype(np.int16)
    last = int(window[-1]) if len(ts) else first_window - 1
    cuts = np.searchsorted(window, np.arange(first_window, last + 2)) + first_position
    spans = [
        {
            "start": int(cuts[k - first_window]),
            "end": int(cuts[k - first_window + 1]),
            "from_time": origin + k * span,
            "to_time": origin + (k + 1) * span,
        }
        for k in range(first_window, last + 1)
    ]
    _add_times(ts, spans, first_position)
    return window, spans


def closed_windows(spans: list[dict], horizon: int) -> int:
    """How many of the calendar `spans` (in order) are closed: a window is closed once the stream
    is known complete past its end (`to_time <= horizon`); the others are held back."""
    return sum(1 for s in spans if s["to_time"] <= horizon)


def parse_until(text: str | None) -> int | None:
    """`--until`: the time up to which the stream is complete, as a UTC date (2026-12-05), a
    UTC date and time (2026-12-05T12:00[:00]) or Unix seconds; None stays None."""
    if text is None:
        return None
    import datetime

    if text.isdigit():
        return int(text)
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            when = datetime.datetime.strptime(text, fmt).replace(tzinfo=datetime.UTC)
        except ValueError:
            continue
        return int(when.timestamp())
    raise InputError(
        f"bad --until {text!r}: use a UTC date (2026-12-05), a date and time (2026-12-05T12:00) or Unix seconds"
    )


def utc(seconds: int) -> str:
    """Seconds as a UTC date (and time, when not midnight), for messages."""
    import time as _time

    fmt = "%Y-%m-%d" if seconds % DAY == 0 else "%Y-%m-%dT%H:%M:%S"
    return _time.strftime(fmt, _time.gmtime(seconds))


@dataclass
class WindowTargets:
    """One window's samples, before they are written: which stream positions (in user-major
    order) are targets of which split, each target's user group, and the window's statistics."""

    targets: dict  # split -> int64 array of positions into the user-major arrays
    groups: dict  # split -> int8 array (index into GROUPS)
    stats: dict


class UserMajor:
    """The stream re-ordered by user (stable, so each user's interactions stay in time order)."""

    def __init__(self, stream):
        perm = np.argsort(stream.user, kind="stable")
        self.user = stream.user[perm]
        self.item = stream.item[perm]
        self.ts = stream.ts[perm]
        self.window = stream.window[perm]
        n_users = len(stream.user_ids)
        self.start = np.searchsorted(self.user, np.arange(n_users + 1)).astype(np.int64)


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The concatenation of arange(lo[k], hi[k]) over k, without a Python loop."""
    n = hi - lo
    return np.repeat(lo - np.cumsum(n) + n, n) + np.arange(int(n.sum()), dtype=np.int64)


@dataclass(frozen=True)
class _Runs:
    """The runs of equal (user, window) in user-major order, one entry per run: a user's
    interactions in one window are one run, and a user's runs are in time order."""

    start: np.ndarray  # position of the run's first interaction
    end: np.ndarray  # one past its last
    user: np.ndarray
    window: np.ndarray  # int64
    group: np.ndarray  # int8, the user's group in that window (index into GROUPS)

    @property
    def length(self) -> np.ndarray:
        return self.end - self.start


def _user_window_runs(by_user: UserMajor) -> _Runs:
    n = len(by_user.user)
    change = np.ones(n, dtype=bool)
    change[1:] = (by_user.user[1:] != by_user.user[:-1]) | (by_user.window[1:] != by_user.window[:-1])
    start = np.flatnonzero(change)
    user = by_user.user[start]
    window = by_user.window[start].astype(np.int64)
    return _Runs(start, np.append(start[1:], n), user, window, _run_groups(user, window))


def _run_groups(run_user: np.ndarray, run_window: np.ndarray) -> np.ndarray:
    """Group of each run: new = nothing before it; dormant = something before, nothing in t-1;
    continuing = something in t-1. A window appears in at most one run per user except -1
    ("before any window", from pre-blocked data), which never makes a sample."""
    first_of_user = np.ones(len(run_user), dtype=bool)
    first_of_user[1:] = run_user[1:] != run_user[:-1]
    group = np.full(len(run_user), 2, dtype=np.int8)  # continuing
    group[first_of_user] = 0  # new
    seen_prev = np.zeros(len(run_user), dtype=bool)
    # For each run, was the user active in window t-1 in an earlier run?  Runs are few (users x
    # active windows), so a per-user scan is cheap and handles the -1 runs of block imports.
    active: set[int] = set()
    for r, window in enumerate(run_window.tolist()):
        if first_of_user[r]:
            active = set()
        seen_prev[r] = (window - 1) in active
        active.add(window)
    group[~first_of_user & ~seen_prev] = 1  # dormant
    return group


def _window_targets(
    by_user: UserMajor, runs: _Runs, t: int, item_first_window: np.ndarray, min_interactions: int
) -> WindowTargets:
    """Window t's targets: of each user with at least `min_interactions` there, the last
    interaction is the test target, the second-to-last the validation one, the others train."""
    eligible = (runs.window == t) & (runs.length >= min_interactions)
    starts, ends, user_groups = runs.start[eligible], runs.end[eligible], runs.group[eligible]
    test, valid = ends - 1, ends - 2
    # Training targets: starts .. ends-3 (a new user's first one has an empty history).
    train = _ranges(starts, ends - 2)
    train_group = np.repeat(user_groups, ends - 2 - starts)
    return WindowTargets(
        targets={"train": train, "valid": valid, "test": test},
        groups={"train": train_group, "valid": user_groups, "test": user_groups},
        stats=_window_stats(by_user, runs, t, eligible, train, item_first_window),
    )


def _window_stats(
    by_user: UserMajor, runs: _Runs, t: int, eligible: np.ndarray, train: np.ndarray, item_first_window: np.ndarray
) -> dict:
    """The statistics of window t (stats.json, the manifest's per-window `stats`)."""
    in_t = runs.window == t
    starts, ends, user_groups = runs.start[eligible], runs.end[eligible], runs.group[eligible]
    items_t = np.unique(by_user.item[_ranges(starts, ends)])
    interactions = int(runs.length[eligible].sum())
    users = int(eligible.sum())
    return {
        "users": users,
        "new_users": int((user_groups == 0).sum()),
        "dormant_users": int((user_groups == 1).sum()),
        "continuing_users": int((user_groups == 2).sum()),
        "items": len(items_t),
        "new_items": int((item_first_window[items_t] == t).sum()),
        "interactions": interactions,
        "all_interactions": int(runs.length[in_t].sum()),
        "ineligible_users": int((in_t & ~eligible).sum()),
        "avg_seq_len": round(interactions / users, 4) if users else 0.0,
        "samples": {"train": len(train), "valid": len(starts), "test": len(starts)},
        "train_targets_without_history": int((by_user.start[by_user.user[train]] == train).sum()),
    }


def targets_per_window(
    by_user: UserMajor, n_windows: int, item_first_window: np.ndarray, min_interactions: int, first: int = 0
) -> list[WindowTargets]:
    """Per window `first`..`n_windows`-1: eligible users, their targets split three ways, groups
    and statistics. (An append passes only the new windows, with each user's recent items before
    them labelled with the window they were last active in: see data_tools/append.py.)"""
    runs = _user_window_runs(by_user)
    return [_window_targets(by_user, runs, t, item_first_window, min_interactions) for t in range(first, n_windows)]
